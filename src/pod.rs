//! The Pod of a review, read once and pruned to the fields the webhook uses, with the accessors
//! every other module reads it through.
//!
//! The rest of the Pod (`managedFields`, volumes, probes, status: most of the bytes) is scanned
//! but never allocated. The pruned value has the same shape as the full Pod for every kept
//! path: a missing key stays missing, `null` stays `null`, and a value of an unexpected type is
//! kept as it came, so the code after it sees exactly what it would have seen in the whole Pod.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which keys of an object to keep; a kept key's value is pruned by its own `Keep` in turn.
#[derive(Clone, Copy)]
enum Keep {
    /// Keep the whole value.
    All,
    /// Keep these keys of an object (anything that is not an object is kept whole).
    Keys(&'static [(&'static str, Keep)]),
    /// Keep every item of a list, each pruned by this (anything that is not a list is kept
    /// whole).
    Items(&'static Keep),
}

const METADATA: Keep = Keep::Keys(&[
    ("name", Keep::All),
    ("generateName", Keep::All),
    ("namespace", Keep::All),
    ("labels", Keep::All),
    ("annotations", Keep::All),
]);

/// A volume: only its name and, for an image volume, the image.
const VOLUME: Keep = Keep::Keys(&[("name", Keep::All), ("image", Keep::All)]);

const SPEC: Keep = Keep::Keys(&[
    ("containers", Keep::All),
    ("initContainers", Keep::All),
    ("ephemeralContainers", Keep::All),
    ("imagePullSecrets", Keep::All),
    ("volumes", Keep::Items(&VOLUME)),
]);

const POD: Keep = Keep::Keys(&[
    ("apiVersion", Keep::All),
    ("kind", Keep::All),
    ("metadata", METADATA),
    ("spec", SPEC),
]);

/// `deserialize_with` for a review's `object` / `oldObject`: absent or `null` → `None` (as
/// `Option<Value>` reads them), else the pruned Pod.
pub fn pruned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pod>, D::Error> {
    Pruned(POD)
        .deserialize(d)
        .map(|v| (!v.is_null()).then_some(Pod(v)))
}

/// The label (on Pods and namespaces) that opts a workload out (`disabled`) or a namespace in.
pub const INJECT_LABEL: &str = "image-mirror/inject";

/// Where in a Pod spec an image is named: the three container lists, and image volumes
/// (`spec.volumes[].image.reference`, which the kubelet pulls like a container image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSite {
    Containers,
    InitContainers,
    EphemeralContainers,
    Volumes,
}

impl ImageSite {
    /// The field name in `spec`.
    pub fn field(self) -> &'static str {
        match self {
            ImageSite::Containers => "containers",
            ImageSite::InitContainers => "initContainers",
            ImageSite::EphemeralContainers => "ephemeralContainers",
            ImageSite::Volumes => "volumes",
        }
    }

    /// The path of the image under one item of the list.
    pub fn image_path(self) -> &'static [&'static str] {
        match self {
            ImageSite::Volumes => &["image", "reference"],
            _ => &["image"],
        }
    }

    /// The `kind` label of the rewrite metrics.
    pub fn label(self) -> &'static str {
        match self {
            ImageSite::Containers => "container",
            ImageSite::InitContainers => "init-container",
            ImageSite::EphemeralContainers => "ephemeral-container",
            ImageSite::Volumes => "image-volume",
        }
    }

    /// How warnings name one item: `container "web"`, `volume "models"`.
    pub fn noun(self) -> &'static str {
        match self {
            ImageSite::Volumes => "volume",
            _ => "container",
        }
    }
}

/// A well-formed image: an object in one of the lists, with a string image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub site: ImageSite,
    pub index: usize,
    /// The container's or volume's name; `containers[2]`-style when the Pod gave none.
    pub name: String,
    pub image: &'a str,
}

impl ImageRef<'_> {
    /// Its key in the original-images record: the container's name, `volumes/NAME` for an
    /// image volume (volume and container names may be the same).
    pub fn record_key(&self) -> String {
        match self.site {
            ImageSite::Volumes => format!("volumes/{}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// A Pod as a review carries it, pruned ([`pruned`]). Nothing here assumes the Pod is well
/// formed: every accessor answers `None` or nothing for a shape it does not expect.
#[derive(Debug, Clone, PartialEq)]
pub struct Pod(Value);

impl Pod {
    /// A Pod from JSON already in memory (tests, benches), pruned like a review's.
    pub fn from_value(v: &Value) -> Option<Pod> {
        pruned(v).ok().flatten()
    }

    /// The pruned JSON.
    pub fn json(&self) -> &Value {
        &self.0
    }

    pub fn metadata(&self) -> Option<&Value> {
        self.0.get("metadata")
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata()?.get(key)?.as_str()
    }

    pub fn name(&self) -> Option<&str> {
        self.meta_str("name")
    }

    /// Pods of a Deployment have only this until the API server names them.
    pub fn generate_name(&self) -> Option<&str> {
        self.meta_str("generateName")
    }

    pub fn namespace(&self) -> Option<&str> {
        self.meta_str("namespace")
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata()?.get("labels")?.get(key)?.as_str()
    }

    /// `metadata.annotations` as it came: missing, `null`, a map, or something odd.
    pub fn annotations(&self) -> Option<&Value> {
        self.metadata()?.get("annotations")
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations()?.get(key)?.as_str()
    }

    /// Whether the Pod opts out with `image-mirror/inject: disabled`.
    pub fn opted_out(&self) -> bool {
        self.label(INJECT_LABEL) == Some("disabled")
    }

    /// `spec.imagePullSecrets` as it came, when it is a list.
    pub fn pull_secret_entries(&self) -> Option<&Vec<Value>> {
        self.0.get("spec")?.get("imagePullSecrets")?.as_array()
    }

    /// The secret names the Pod already lists in `spec.imagePullSecrets`.
    pub fn pull_secrets(&self) -> Vec<&str> {
        self.pull_secret_entries()
            .map(|list| {
                list.iter()
                    .filter_map(|s| s.get("name").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The well-formed images of `sites`; anything malformed (and any volume that is not an
    /// image volume) is passed over.
    pub fn images(&self, sites: &[ImageSite]) -> Vec<ImageRef<'_>> {
        let Some(spec) = self.0.get("spec").and_then(Value::as_object) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &site in sites {
            let Some(items) = spec.get(site.field()).and_then(Value::as_array) else {
                continue;
            };
            for (index, item) in items.iter().enumerate() {
                let image = site
                    .image_path()
                    .iter()
                    .try_fold(item, |v, key| v.get(key))
                    .and_then(Value::as_str);
                let Some(image) = image else {
                    continue;
                };
                let name = match item.get("name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => format!("{}[{index}]", site.field()),
                };
                out.push(ImageRef {
                    site,
                    index,
                    name,
                    image,
                });
            }
        }
        out
    }
}

struct Pruned(Keep);

impl<'de> DeserializeSeed<'de> for Pruned {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        match self.0 {
            Keep::All => Value::deserialize(d),
            keep => d.deserialize_any(PrunedVisitor(keep)),
        }
    }
}

struct PrunedVisitor(Keep);

impl<'de> Visitor<'de> for PrunedVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Keep::Keys(keys) = self.0 else {
            // Not the object this rule expects: kept whole, as the full parse would have it.
            let mut out = Map::new();
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                out.insert(k, v);
            }
            return Ok(Value::Object(out));
        };
        let mut out = Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match keys.iter().find(|(k, _)| *k == key) {
                Some((k, keep)) => {
                    let v = map.next_value_seed(Pruned(*keep))?;
                    out.insert((*k).to_string(), v);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        match self.0 {
            Keep::Items(item) => {
                while let Some(v) = seq.next_element_seed(Pruned(*item))? {
                    out.push(v);
                }
            }
            // Not a list this rule expects: kept whole, as the full parse would have it.
            _ => {
                while let Some(v) = seq.next_element::<Value>()? {
                    out.push(v);
                }
            }
        }
        Ok(Value::Array(out))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the pruned read must equal: the full parse with everything else removed.
    fn pruned_by_hand(full: &Value) -> Value {
        fn keep(v: &Value, rule: Keep) -> Value {
            match (rule, v) {
                (Keep::All, v) => v.clone(),
                (Keep::Keys(keys), Value::Object(m)) => Value::Object(
                    keys.iter()
                        .filter_map(|(k, r)| m.get(*k).map(|v| (k.to_string(), keep(v, *r))))
                        .collect(),
                ),
                (Keep::Items(item), Value::Array(a)) => {
                    Value::Array(a.iter().map(|v| keep(v, *item)).collect())
                }
                (_, v) => v.clone(),
            }
        }
        keep(full, POD)
    }

    fn read(text: &str) -> Value {
        let mut d = serde_json::Deserializer::from_str(text);
        pruned(&mut d)
            .unwrap()
            .map_or(Value::Null, |p| p.json().clone())
    }

    #[test]
    fn keeps_exactly_what_the_webhook_reads() {
        let cases = [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "n",
                "labels": {"x": "y"}, "annotations": null, "managedFields": [{"manager": "m"}],
                "uid": "u"}, "spec": {"containers": [{"name": "c", "image": "nginx", "env": []}],
                "volumes": [{"name": "v"}], "imagePullSecrets": [{"name": "s"}]},
                "status": {"phase": "Pending"}}),
            json!({"metadata": null, "spec": null}),
            json!({"spec": {"containers": null, "initContainers": [], "ephemeralContainers": [1, "x"]}}),
            json!({"metadata": "odd", "spec": [1, 2, {"containers": 3}]}),
            json!({}),
            json!([{"metadata": {}}]),
            json!("a string"),
            json!(null),
            json!(12.5),
            json!({"metadata": {"generateName": "web-", "labels": {"image-mirror/inject": "disabled"}}}),
        ];
        for full in cases {
            let text = serde_json::to_string(&full).unwrap();
            assert_eq!(read(&text), pruned_by_hand(&full), "{text}");
        }
    }

    #[test]
    fn every_admission_fixture_reads_the_same_as_the_full_pod() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let full: Value = serde_json::from_str(&text).unwrap();
            for field in ["object", "oldObject"] {
                if let Some(obj) = full["request"].get(field) {
                    let raw = serde_json::to_string(obj).unwrap();
                    assert_eq!(
                        read(&raw),
                        pruned_by_hand(obj),
                        "{}: {field}",
                        path.display()
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen >= 20, "{seen}");
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        // Keys the pruning cares about, mixed with others, at every depth.
        let key = prop::sample::select(vec![
            "metadata",
            "spec",
            "name",
            "labels",
            "annotations",
            "containers",
            "image",
            "imagePullSecrets",
            "status",
            "managedFields",
            "kind",
            "volumes",
            "reference",
            "other",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z/:.@]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn any_json_reads_as_the_full_parse_pruned(v in json_value()) {
            let text = serde_json::to_string(&v).unwrap();
            proptest::prop_assert_eq!(read(&text), pruned_by_hand(&v));
        }
    }

    #[test]
    fn malformed_containers_are_passed_over() {
        let pod = Pod::from_value(&json!({"spec": {"containers": [{"name": "a"}, 7, {"name": "b", "image": 3}, {"image": "x"}], "initContainers": null}})).unwrap();
        let found = pod.images(&[ImageSite::Containers, ImageSite::InitContainers]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "containers[3]");
        assert_eq!(found[0].index, 3);
        for odd in [json!({"spec": 1}), json!({})] {
            let pod = Pod::from_value(&odd).unwrap();
            assert!(pod.images(&[ImageSite::Containers]).is_empty());
        }
    }

    #[test]
    fn image_volumes_are_images_other_volumes_are_not() {
        let pod = Pod::from_value(&json!({"spec": {"volumes": [
            {"name": "models", "image": {"reference": "quay.io/crio/artifact:v2", "pullPolicy": "IfNotPresent"}},
            {"name": "config", "configMap": {"name": "c", "items": [{"key": "k", "path": "p"}]}},
            {"name": "odd", "image": {"reference": 7}},
            {"image": {"reference": "redis:7"}}]}}))
        .unwrap();
        let found = pod.images(&[ImageSite::Volumes]);
        let seen: Vec<(String, &str, usize)> = found
            .iter()
            .map(|i| (i.record_key(), i.image, i.index))
            .collect();
        assert_eq!(
            seen,
            [
                ("volumes/models".to_string(), "quay.io/crio/artifact:v2", 0),
                ("volumes/volumes[3]".to_string(), "redis:7", 3)
            ]
        );
        // The configMap volume is pruned to its name.
        assert_eq!(pod.json()["spec"]["volumes"][1], json!({"name": "config"}));
    }

    #[test]
    fn accessors_read_what_is_there_and_nothing_else() {
        let pod = Pod::from_value(
            &json!({"metadata": {"generateName": "web-", "namespace": "n",
            "labels": {"image-mirror/inject": "disabled"}, "annotations": {"a": "b", "n": 1}},
            "spec": {"imagePullSecrets": [{"name": "s"}, {"other": 1}, "x"]}}),
        )
        .unwrap();
        assert_eq!((pod.name(), pod.generate_name()), (None, Some("web-")));
        assert_eq!(pod.namespace(), Some("n"));
        assert!(pod.opted_out());
        assert_eq!(
            (pod.annotation("a"), pod.annotation("n")),
            (Some("b"), None)
        );
        assert_eq!(pod.pull_secrets(), ["s"]);
        let odd =
            Pod::from_value(&json!({"metadata": "x", "spec": {"imagePullSecrets": {}}})).unwrap();
        assert!(!odd.opted_out() && odd.pull_secrets().is_empty() && odd.name().is_none());
        assert!(Pod::from_value(&Value::Null).is_none());
    }

    #[test]
    fn escaped_keys_are_matched() {
        // JSON may escape any character of a key; the key is what it decodes to.
        let v = read(r#"{"meta\u0064ata": {"na\u006de": "a"}, "spec": {}}"#);
        assert_eq!(v, json!({"metadata": {"name": "a"}, "spec": {}}));
    }
}
