//! Image changes → a minimal RFC 6902 JSON Patch for the Pod they apply to.
//!
//! Pure, and only writes (the Pod is read through [`crate::pod`]). Patches are always relative
//! to the raw JSON the API server sent: re-serialising a typed Pod would drop
//! fields unknown to k8s-openapi. The patch must apply cleanly to what the API server holds — a
//! patch that decodes but fails to apply rejects the Pod even with `failurePolicy: Ignore`:
//! - `add` needs an existing parent, so a missing (or, as Go re-encodes it, empty) map or list
//!   is added whole;
//! - `add` on an existing member replaces it, so the merged pull-secret list is one `add`;
//! - `replace` is used only where the value exists (a container's `image`).

use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use jsonptr::PointerBuf;
use serde_json::{Map, Value};

pub use crate::pod::ORIGINAL_IMAGES_ANNOTATION;
use crate::pod::{ImageRef, Member, Pod};

/// One image's rewrite (or, in report mode, one that would have been): the image as the Pod
/// has it, and what it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChange<'p> {
    pub slot: ImageRef<'p>,
    pub target: String,
    /// The source's registry and the mirror's name, for the metrics.
    pub source_registry: String,
    pub mirror: String,
}

/// A patch, and the pull secrets it adds to the Pod.
#[derive(Debug, Default)]
pub struct PodPatch {
    pub ops: Vec<PatchOperation>,
    pub added_secrets: Vec<String>,
}

/// Builds the patch for `changes` and the pull secrets the new images need.
/// Returns no operations when there is nothing to change.
pub fn build_patch(pod: &Pod, changes: &[ImageChange], pull_secrets: &[&str]) -> PodPatch {
    if changes.is_empty() {
        return PodPatch::default();
    }
    let mut ops = image_ops(changes);
    let (secret_ops, added_secrets) = pull_secrets_ops(pod, pull_secrets);
    ops.extend(secret_ops);
    if let Some(op) = annotation_op(pod, changes) {
        ops.push(op);
    }
    PodPatch { ops, added_secrets }
}

/// One `replace` of each changed image, and nothing else.
pub fn image_ops(changes: &[ImageChange]) -> Vec<PatchOperation> {
    let mut ops = Vec::with_capacity(changes.len() + 2);
    for c in changes {
        let site = c.slot.site;
        let index = c.slot.index.to_string();
        let tokens = ["spec", site.field(), index.as_str()]
            .into_iter()
            .chain(site.image_path().iter().copied());
        ops.push(PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::from_tokens(tokens),
            value: Value::String(c.target.clone()),
        }));
    }
    ops
}

/// The pull secrets the Pod lacks, added: one `add /spec/imagePullSecrets/-` each to a list
/// that has entries (what the Pod had stays as it was, even entries we do not understand), else
/// the whole list; nothing when every secret is there already.
fn pull_secrets_ops(pod: &Pod, wanted: &[&str]) -> (Vec<PatchOperation>, Vec<String>) {
    let existing = pod.pull_secrets();
    let mut missing: Vec<&str> = Vec::new();
    for &name in wanted {
        if !existing.contains(&name) && !missing.contains(&name) {
            missing.push(name);
        }
    }
    let entry = |name: &str| serde_json::json!({ "name": name });
    let ops = match pod.pull_secret_list() {
        _ if missing.is_empty() => Vec::new(),
        // Go omits an empty list when it re-encodes the Pod: only a list with entries is there.
        Member::Read(list) if list.entries > 0 => missing
            .iter()
            .map(|name| {
                PatchOperation::Add(AddOperation {
                    path: PointerBuf::from_tokens(["spec", "imagePullSecrets", "-"]),
                    value: entry(name),
                })
            })
            .collect(),
        _ => vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["spec", "imagePullSecrets"]),
            value: Value::Array(missing.iter().map(|n| entry(n)).collect()),
        })],
    };
    (ops, missing.into_iter().map(str::to_string).collect())
}

/// The original-images record (JSON: slot key → image; the key is the container's name, or
/// `volumes/NAME` for an image volume) for `changes`, merged with the one an earlier invocation left; `None` when there is nothing to record.
pub fn original_images(pod: &Pod, changes: &[ImageChange]) -> Option<String> {
    if changes.is_empty() {
        return None;
    }
    let mut record: Map<String, Value> = pod
        .original_images()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    for c in changes {
        // A re-invocation keeps the first original, not our own earlier rewrite.
        record
            .entry(c.slot.record_key())
            .or_insert_with(|| Value::String(c.slot.image.to_string()));
    }
    // Straight into a string: `Value`'s Display goes through the formatting machinery.
    serde_json::to_string(&record).ok()
}

/// Records the original images in the Pod's annotation.
fn annotation_op(pod: &Pod, changes: &[ImageChange]) -> Option<PatchOperation> {
    let value = Value::String(original_images(pod, changes)?);
    let op = match (pod.metadata_shape(), pod.annotations()) {
        (Member::Absent, _) => AddOperation {
            path: PointerBuf::from_tokens(["metadata"]),
            value: serde_json::json!({ "annotations": { ORIGINAL_IMAGES_ANNOTATION: value } }),
        },
        (Member::Null | Member::Odd, _) => return None,
        (_, Member::Read(map)) if map.any => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION]),
            value,
        },
        // Missing, null or empty (Go omits an empty map when it re-encodes): add it whole.
        (_, Member::Absent | Member::Null | Member::Read(_)) => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: serde_json::json!({ ORIGINAL_IMAGES_ANNOTATION: value }),
        },
        (_, Member::Odd) => return None,
    };
    Some(PatchOperation::Add(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::ImageSite;
    use serde_json::json;

    /// `key` as the original-images record has it (`volumes/NAME` for an image volume).
    fn change<'a>(
        site: ImageSite,
        index: usize,
        key: &str,
        from: &'a str,
        to: &str,
    ) -> ImageChange<'a> {
        let name = key.strip_prefix("volumes/").unwrap_or(key);
        ImageChange {
            slot: ImageRef {
                site,
                index,
                name: name.into(),
                image: from,
            },
            target: to.into(),
            source_registry: "docker.io".into(),
            mirror: "m".into(),
        }
    }

    fn apply(pod: &Value, ops: Vec<PatchOperation>) -> Value {
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &json_patch::Patch(ops)).expect("patch applies");
        doc
    }

    fn build(pod: &Value, changes: &[ImageChange], secrets: &[&str]) -> PodPatch {
        build_patch(&Pod::from_value(pod).unwrap(), changes, secrets)
    }

    #[test]
    fn pointer_segments_are_escaped() {
        let pod = json!({"metadata": {"annotations": {"a/b~c": "x"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}});
        let ops = build(
            &pod,
            &[change(ImageSite::Containers, 0, "c", "nginx", "m/nginx")],
            &[],
        )
        .ops;
        let text = serde_json::to_string(&ops).unwrap();
        assert!(
            text.contains("/metadata/annotations/image-mirror~1original-images"),
            "{text}"
        );
        let out = apply(&pod, ops);
        assert_eq!(out["metadata"]["annotations"]["a/b~c"], "x");
        assert_eq!(
            out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION],
            r#"{"c":"nginx"}"#
        );
    }

    #[test]
    fn shapes_of_annotations_and_secrets() {
        let c = [change(ImageSite::Containers, 0, "c", "a", "b")];
        for pod in [
            json!({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "a"}]}}),
            json!({"metadata": {"annotations": null}, "spec": {"containers": [{"name": "c", "image": "a"}], "imagePullSecrets": null}}),
            json!({"metadata": {"annotations": {}}, "spec": {"containers": [{"name": "c", "image": "a"}], "imagePullSecrets": []}}),
            json!({"spec": {"containers": [{"name": "c", "image": "a"}]}}),
        ] {
            let out = apply(&pod, build(&pod, &c, &["s"]).ops);
            assert_eq!(out["spec"]["containers"][0]["image"], "b");
            assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "s"}]));
            assert!(out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].is_string());
        }
    }

    #[test]
    fn secrets_are_merged_without_duplicates() {
        let pod = json!({"spec": {"containers": [{"name": "c", "image": "a"}], "imagePullSecrets": [{"name": "other"}, {"name": "s"}]}});
        let c = [change(ImageSite::Containers, 0, "c", "a", "b")];
        let patch = build(&pod, &c, &["s", "s"]);
        assert!(patch.added_secrets.is_empty());
        let ops = patch.ops;
        // The secret is there already: no secret operation at all.
        assert_eq!(ops.len(), 2);
        let patch = build(&pod, &c, &["t", "s", "t"]);
        assert_eq!(patch.added_secrets, ["t"]);
        let out = apply(&pod, patch.ops);
        assert_eq!(
            out["spec"]["imagePullSecrets"],
            json!([{"name": "other"}, {"name": "s"}, {"name": "t"}])
        );
    }

    #[test]
    fn earlier_record_is_kept_on_reinvocation() {
        let pod = json!({"metadata": {"annotations": {ORIGINAL_IMAGES_ANNOTATION: r#"{"a":"nginx"}"#}},
            "spec": {"containers": [{"name": "a", "image": "m/nginx"}, {"name": "b", "image": "redis"}]}});
        let out = apply(
            &pod,
            build(
                &pod,
                &[change(ImageSite::Containers, 1, "b", "redis", "m/redis")],
                &[],
            )
            .ops,
        );
        assert_eq!(
            out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION],
            r#"{"a":"nginx","b":"redis"}"#
        );
    }

    #[test]
    fn an_image_volume_s_reference_is_replaced() {
        let pod = json!({"spec": {"volumes": [{"name": "cfg", "configMap": {"name": "x"}},
            {"name": "models", "image": {"reference": "redis:7", "pullPolicy": "Always"}}]}});
        let c = [change(
            ImageSite::Volumes,
            1,
            "volumes/models",
            "redis:7",
            "m/redis:7",
        )];
        let out = apply(&pod, build(&pod, &c, &["s"]).ops);
        assert_eq!(
            out["spec"]["volumes"][1]["image"],
            json!({"reference": "m/redis:7", "pullPolicy": "Always"})
        );
        assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "s"}]));
    }

    #[test]
    fn no_changes_no_patch() {
        let none = build(&json!({}), &[], &["s"]);
        assert!(none.ops.is_empty() && none.added_secrets.is_empty());
    }
}
