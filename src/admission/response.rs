//! The response AdmissionReview, written by hand: kube-core's `AdmissionResponse` serialises
//! the patch as an array of numbers, where the API expects base64 bytes.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;

use super::Mutation;

/// The audit annotation of report mode.
pub const WOULD_REWRITE_AUDIT_KEY: &str = "would-rewrite";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Bytes in the API, hence a base64 string in JSON; written by hand after the rest (see
    /// [`response_body`]), so never set here.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    /// Each said as `image-mirror: <warning>`, so that a kubectl user knows who speaks.
    #[serde(skip_serializing_if = "<[String]>::is_empty", serialize_with = "ours")]
    warnings: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    audit_annotations: BTreeMap<&'static str, String>,
    /// A `metav1.Status`, only on a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: &'a str,
}

fn ours<S: serde::Serializer>(warnings: &&[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(warnings.len()))?;
    let mut said = String::new();
    for w in warnings.iter() {
        said.clear();
        said.push_str("image-mirror: ");
        said.push_str(w);
        seq.serialize_element(said.as_str())?;
    }
    seq.end()
}

/// The response AdmissionReview of strict mode's refusal: `allowed: false` and why.
pub fn refusal_body(api_version: &str, uid: &str, code: u16, message: &str) -> Vec<u8> {
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed: false,
            patch_type: None,
            patch: None,
            warnings: &[],
            audit_annotations: BTreeMap::new(),
            status: Some(StatusOut {
                status: "Failure",
                code,
                reason: if code >= 500 {
                    "InternalError"
                } else {
                    "Forbidden"
                },
                message,
            }),
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The audit log's longest would-rewrite record: every audit event of the Pod carries it, and
/// a forged review's Pod can name thousands of images.
const AUDIT_RECORD_MAX: usize = 64 * 1024;

/// What each image would have become (JSON: key → target), cut to [`AUDIT_RECORD_MAX`] bytes
/// with a last entry `"…"` that says how many were left out.
fn would_rewrite_record(mutation: &Mutation) -> String {
    let mut record = serde_json::Map::new();
    let mut len = 2;
    let mut left_out = 0;
    for r in &mutation.would_rewrite {
        // Its JSON text: two quoted strings, a colon and a comma (escapes may add a little).
        let key = r.slot.record_key();
        let adds = key.len() + r.target.len() + 6;
        if left_out > 0 || len + adds > AUDIT_RECORD_MAX {
            left_out += 1;
            continue;
        }
        len += adds;
        record.insert(key, serde_json::Value::String(r.target.clone()));
    }
    if left_out > 0 {
        record.insert("…".into(), format!("{left_out} more").into());
    }
    serde_json::Value::Object(record).to_string()
}

/// The response AdmissionReview: `allowed: true`, and the patch when there is one.
///
/// Written once into one buffer: the review without its patch by serde, then the patch's
/// base64 spliced in before the closing braces. Base64 needs no escaping, so the encoded text
/// is neither copied into a string of its own nor scanned again for escapes.
pub fn response_body(api_version: &str, uid: &str, mutation: &Mutation) -> Vec<u8> {
    let mut audit = BTreeMap::new();
    if !mutation.would_rewrite.is_empty() {
        // Like the original-images record: what each image would have become. The API server
        // prefixes the key with the webhook's name (`<webhook>/would-rewrite`): a key with a
        // `/` of its own would be dropped.
        audit.insert(WOULD_REWRITE_AUDIT_KEY, would_rewrite_record(mutation));
    }
    if !mutation.rewrites.is_empty() {
        audit.insert("rewrites", mutation.rewrites.len().to_string());
        let mut mirrors: Vec<&str> = mutation
            .rewrites
            .iter()
            .map(|r| r.mirror.as_str())
            .collect();
        mirrors.sort_unstable();
        mirrors.dedup();
        audit.insert("mirrors", mirrors.join(","));
    }
    let has_patch = !mutation.patch.is_empty();
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed: true,
            patch_type: has_patch.then_some("JSONPatch"),
            patch: None,
            warnings: &mutation.warnings,
            audit_annotations: audit,
            status: None,
        },
    };
    let mut body = Vec::with_capacity(512);
    if serde_json::to_writer(&mut body, &out).is_err() {
        return Vec::new();
    }
    if has_patch {
        let Ok(json) = serde_json::to_vec(&mutation.patch) else {
            return Vec::new();
        };
        // `…}}` → `…,"patch":"<base64>"}}`: the response object's last member.
        let end = body.len() - 2;
        let tail = body.split_off(end);
        body.reserve(json.len() * 4 / 3 + 16);
        body.extend_from_slice(b",\"patch\":\"");
        let start = body.len();
        body.resize(
            start + base64::encoded_len(json.len(), true).unwrap_or(0),
            0,
        );
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&json, &mut body[start..])
            .unwrap_or(0);
        body.truncate(start + written);
        body.push(b'"');
        body.extend_from_slice(&tail);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::ImageChange;
    use crate::pod::{ImageRef, ImageSite};

    #[test]
    fn the_audit_record_is_cut_and_says_how_much() {
        let record = |n: usize| ImageChange {
            slot: ImageRef {
                site: ImageSite::Containers,
                index: n,
                name: format!("c{n}"),
                image: "nginx",
            },
            target: format!("ghcr.io/m/{}", "x".repeat(100)),
            source_registry: "docker.io".into(),
            mirror: "m".into(),
        };
        let few = Mutation {
            would_rewrite: (0..3).map(record).collect(),
            ..Mutation::default()
        };
        let text = would_rewrite_record(&few);
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.len(), 3);
        let many = Mutation {
            would_rewrite: (0..2048).map(record).collect(),
            ..Mutation::default()
        };
        let text = would_rewrite_record(&many);
        assert!(text.len() <= AUDIT_RECORD_MAX + 32, "{}", text.len());
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        let kept = parsed.len() - 1;
        assert_eq!(parsed["…"], format!("{} more", 2048 - kept));
    }
}
