use super::read::cut;
use super::*;
use serde_json::{json, Map, Value};

/// What the reader must give: the same fields read off the fully parsed JSON, by hand.
fn by_hand(full: &Value) -> Option<Pod> {
    fn member<T>(v: Option<&Value>, read: impl FnOnce(&Map<String, Value>) -> T) -> Member<T> {
        match v {
            None => Member::Absent,
            Some(Value::Null) => Member::Null,
            Some(Value::Object(m)) => Member::Read(read(m)),
            Some(_) => Member::Odd,
        }
    }
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(cut);
    let metadata = |m: &Map<String, Value>| Metadata {
        name: text(m.get("name")),
        generate_name: text(m.get("generateName")),
        namespace: text(m.get("namespace")),
        inject: m
            .get("labels")
            .and_then(Value::as_object)
            .and_then(|l| text(l.get(INJECT_LABEL))),
        annotations: member(m.get("annotations"), |a| Annotations {
            original_images: text(a.get(ORIGINAL_IMAGES_ANNOTATION)),
            any: !a.is_empty(),
        }),
    };
    let slots = |site: ImageSite, list: Option<&Value>| {
        let mut out = Slots::default();
        for (index, item) in list
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if out.items.len() >= MAX_IMAGES {
                out.overflow = true;
                break;
            }
            let image = site.image_path().iter().try_fold(item, |v, k| v.get(k));
            if let (Some(image), true) = (text(image), item.is_object()) {
                out.items.push(Slot {
                    index,
                    name: text(item.get("name")),
                    image,
                });
            }
        }
        out
    };
    let spec = |m: &Map<String, Value>| Spec {
        images: ImageSite::ALL.map(|site| slots(site, m.get(site.field()))),
        pull_secrets: match m.get("imagePullSecrets") {
            None => Member::Absent,
            Some(Value::Null) => Member::Null,
            Some(Value::Array(list)) => Member::Read(PullSecrets {
                names: list
                    .iter()
                    .take(MAX_PULL_SECRETS)
                    .filter_map(|e| e.as_object().and_then(|e| text(e.get("name"))))
                    .collect(),
                entries: list.len(),
                overflow: list.len() > MAX_PULL_SECRETS,
            }),
            Some(_) => Member::Odd,
        },
    };
    match full {
        Value::Null => None,
        Value::Object(m) => Some(Pod {
            metadata: member(m.get("metadata"), metadata),
            spec: member(m.get("spec"), spec),
        }),
        _ => Some(Pod {
            metadata: Member::Odd,
            spec: Member::Odd,
        }),
    }
}

fn read(text: &str) -> Option<Pod> {
    let mut d = serde_json::Deserializer::from_str(text);
    pruned(&mut d).unwrap()
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
        json!({"metadata": {"annotations": {"image-mirror/original-images": 3}}}),
    ];
    for full in cases {
        let text = serde_json::to_string(&full).unwrap();
        assert_eq!(read(&text), by_hand(&full), "{text}");
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
                assert_eq!(read(&raw), by_hand(obj), "{}: {field}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 20, "{seen}");
}

fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    // Keys the reader cares about, mixed with others, at every depth.
    let key = prop::sample::select(vec![
        "metadata",
        "spec",
        "name",
        "generateName",
        "labels",
        "annotations",
        INJECT_LABEL,
        ORIGINAL_IMAGES_ANNOTATION,
        "containers",
        "initContainers",
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
    fn any_json_reads_as_the_full_parse_does(v in json_value()) {
        let text = serde_json::to_string(&v).unwrap();
        proptest::prop_assert_eq!(read(&text), by_hand(&v));
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
}

#[test]
fn accessors_read_what_is_there_and_nothing_else() {
    let pod = Pod::from_value(
        &json!({"metadata": {"generateName": "web-", "namespace": "n",
        "labels": {"image-mirror/inject": "disabled"}, "annotations": {"a": "b", ORIGINAL_IMAGES_ANNOTATION: "{}"}},
        "spec": {"imagePullSecrets": [{"name": "s"}, {"other": 1}, "x"]}}),
    )
    .unwrap();
    assert_eq!((pod.name(), pod.generate_name()), (None, Some("web-")));
    assert_eq!(pod.namespace(), Some("n"));
    assert!(pod.opted_out());
    assert_eq!(pod.original_images(), Some("{}"));
    assert_eq!(pod.pull_secrets(), ["s"]);
    assert_eq!(pod.pull_secret_list().read().map(|p| p.entries), Some(3));
    let odd = Pod::from_value(&json!({"metadata": "x", "spec": {"imagePullSecrets": {}}})).unwrap();
    assert!(!odd.opted_out() && odd.pull_secrets().is_empty() && odd.name().is_none());
    assert_eq!(odd.pull_secret_list(), Member::Odd);
    assert_eq!(odd.metadata_shape(), Member::Odd);
    assert!(Pod::from_value(&Value::Null).is_none());
}

#[test]
fn escaped_keys_are_matched() {
    // JSON may escape any character of a key; the key is what it decodes to.
    let pod = read(r#"{"meta\u0064ata": {"na\u006de": "a"}, "spec": {}}"#).unwrap();
    assert_eq!(pod.name(), Some("a"));
}

#[test]
fn what_is_kept_is_bounded_whatever_is_sent() {
    // Junk in the lists is scanned, not kept.
    let zeros = format!(
        r#"{{"spec": {{"containers": [{}0]}}}}"#,
        "0,".repeat(500_000)
    );
    let pod = read(&zeros).unwrap();
    assert!(pod.images(&[ImageSite::Containers]).is_empty());
    assert!(!pod.too_large());
    // Past the bound the rest is not read, and the Pod says so.
    let many: Vec<Value> = (0..MAX_IMAGES + 5)
        .map(|i| json!({"name": format!("c{i}"), "image": "nginx"}))
        .collect();
    let pod = Pod::from_value(&json!({"spec": {"initContainers": many}})).unwrap();
    assert_eq!(pod.images(&[ImageSite::InitContainers]).len(), MAX_IMAGES);
    assert!(pod.too_large());
    let secrets: Vec<Value> = (0..MAX_PULL_SECRETS + 1)
        .map(|i| json!({"name": format!("s{i}")}))
        .collect();
    let pod = Pod::from_value(&json!({"spec": {"imagePullSecrets": secrets}})).unwrap();
    assert!(pod.too_large());
    assert_eq!(pod.pull_secrets().len(), MAX_PULL_SECRETS);
    // A string no name or reference could be is kept cut, and cannot parse as a reference.
    let long = "a".repeat(3 << 20);
    let pod = Pod::from_value(&json!({"metadata": {"name": long},
        "spec": {"containers": [{"name": "c", "image": format!("nginx:{long}")}]}}))
    .unwrap();
    assert_eq!(pod.name().map(str::len), Some(CUT_TO + '…'.len_utf8()));
    let image = pod.images(&[ImageSite::Containers])[0].image;
    assert!(
        image.len() < MAX_TEXT && image.ends_with('…'),
        "{}",
        image.len()
    );
    assert!(crate::Reference::parse(image).is_err());
    // Cut on a character boundary.
    assert_eq!(cut(&"é".repeat(MAX_TEXT)).chars().count(), CUT_TO / 2 + 1);
}
