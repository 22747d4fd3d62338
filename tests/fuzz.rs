//! Fuzz-style property runs over the three parsers that take outside input: the reference
//! parser, the table loader and the review decoder (with what follows it: plan, finish, patch).
//! Each gets arbitrary bytes and structure-aware input built from its grammar; none may panic,
//! and what they accept must hold together (a canonical reference reparses to itself; every
//! patch applies to its Pod).
//!
//! The test run keeps them small; `scripts/fuzz.sh` runs 1,000,000 cases per target
//! (`IMW_FUZZ_CASES`). cargo-fuzz would need a nightly toolchain, which cannot be had here.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{json, Value};

use image_mirror_webhook::admission::{plan, response_body, Review};
use image_mirror_webhook::config::Config as TableConfig;
use image_mirror_webhook::mapping::Table;
use image_mirror_webhook::mirror::Presence;
use image_mirror_webhook::Reference;

fn cases() -> u32 {
    std::env::var("IMW_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..600)
}

// --- references --------------------------------------------------------------------------------

/// Strings shaped like references: hosts, ports, IPv6, paths, tags and digests, with the
/// characters and lengths the grammar turns on.
fn reference_like() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        Just(String::new()),
        Just("docker.io/".to_string()),
        Just("index.docker.io/".to_string()),
        Just("registry-1.docker.io/".to_string()),
        Just("localhost/".to_string()),
        "[a-zA-Z0-9-]{1,10}(\\.[a-zA-Z0-9-]{1,6}){0,2}(:[0-9]{0,6})?/",
        "\\[[0-9a-fA-F:]{0,12}\\](:[0-9]{1,5})?/",
    ];
    let component = "[a-zA-Z0-9._-]{0,12}";
    let path = prop::collection::vec(component, 1..5).prop_map(|c| c.join("/"));
    let tag = prop::option::of("[A-Za-z0-9_.-]{0,130}");
    let digest = prop::option::of(("(sha256|sha512|sha1|md5|x)", "[a-fA-F0-9]{0,130}"));
    (host, path, tag, digest).prop_map(|(h, p, t, d)| {
        let mut s = format!("{h}{p}");
        if let Some(t) = t {
            s.push(':');
            s.push_str(&t);
        }
        if let Some((algorithm, hex)) = d {
            s.push('@');
            s.push_str(&algorithm);
            s.push(':');
            s.push_str(&hex);
        }
        s
    })
}

fn check_reference(s: &str) -> Result<(), TestCaseError> {
    if let Ok(r) = Reference::parse(s) {
        let again = Reference::parse(r.as_str());
        prop_assert_eq!(again.as_ref(), Ok(&r), "{} -> {}", s, r);
        let _ = (r.familiar(), r.canonical(), r.effective_tag());
    }
    Ok(())
}

#[test]
fn reference_parser_on_arbitrary_bytes() {
    proptest!(config(), |(b in bytes())| {
        check_reference(&String::from_utf8_lossy(&b))?;
    });
}

#[test]
fn reference_parser_on_reference_shaped_input() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    proptest!(config(), |(s in prop_oneof![reference_like(), common::strategies::valid_reference()])| {
        check_reference(&s)?;
        let _ = table.decide(&s);
    });
}

// --- tables ------------------------------------------------------------------------------------

/// Table files made of the schema's own keys and values, right and wrong.
fn table_like() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just("repository".to_string()),
        Just("pull-through".to_string()),
        Just("always".to_string()),
        Just("if-present".to_string()),
        Just("10m".to_string()),
        Just("[linux/amd64]".to_string()),
        Just("{docker.io: hub}".to_string()),
        "[a-z0-9./*:-]{0,16}",
        "[0-9]{1,7}",
    ];
    let mirror = (
        "[a-z]{1,5}",
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "type",
                    "registry",
                    "prefix",
                    "naming",
                    "pullSecret",
                    "upstreams",
                    "swap",
                    "copy",
                    "platforms",
                    "bogus",
                ]),
                scalar.clone(),
            ),
            0..6,
        ),
    )
        .prop_map(|(name, fields)| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("  {name}: {{{}}}\n", body.join(", "))
        });
    let entry = (
        reference_like(),
        reference_like(),
        prop::option::of(scalar.clone()),
    )
        .prop_map(|(s, t, swap)| {
            let swap = swap.map(|v| format!(", swap: {v}")).unwrap_or_default();
            format!("  - {{source: \"{s}\", target: \"{t}\"{swap}}}\n")
        });
    let rule = (
        prop::collection::vec("[a-z0-9.*/:{}\\[-]{0,20}", 0..3),
        "[a-z]{1,5}",
        prop::option::of(scalar.clone()),
    )
        .prop_map(|(globs, mirror, copy)| {
            let copy = copy.map(|v| format!(", copy: {v}")).unwrap_or_default();
            format!("  - {{match: {globs:?}, mirror: {mirror}{copy}}}\n")
        });
    (
        prop::collection::vec(mirror, 0..3),
        prop::collection::vec(entry, 0..4),
        prop::collection::vec(rule, 0..3),
        prop::option::of(("[a-zA-Z]{1,14}", scalar.clone())),
        prop::option::of(("[a-zA-Z]{1,12}", scalar)),
    )
        .prop_map(|(mirrors, entries, rules, checks, copies)| {
            // Never empty (an empty table is refused): the other sections are all optional.
            let mut y = String::from("namespaces: {exclude: [kube-system]}\n");
            if !mirrors.is_empty() {
                y.push_str("mirrors:\n");
                mirrors.iter().for_each(|m| y.push_str(m));
            }
            if !entries.is_empty() {
                y.push_str("images:\n");
                entries.iter().for_each(|e| y.push_str(e));
            }
            if !rules.is_empty() {
                y.push_str("rules:\n");
                rules.iter().for_each(|r| y.push_str(r));
            }
            if let Some((k, v)) = checks {
                y.push_str(&format!("checks: {{{k}: {v}}}\n"));
            }
            if let Some((k, v)) = copies {
                y.push_str(&format!("copies: {{{k}: {v}}}\n"));
            }
            y
        })
}

#[test]
fn table_loader_on_arbitrary_bytes() {
    proptest!(config(), |(b in bytes())| {
        let _ = TableConfig::parse("fuzz.yaml", &String::from_utf8_lossy(&b));
    });
}

#[test]
fn table_loader_on_table_shaped_input() {
    let loaded = AtomicUsize::new(0);
    proptest!(config(), |(yaml in table_like(), image in reference_like())| {
        match TableConfig::parse("fuzz.yaml", &yaml) {
            Ok(c) => {
                loaded.fetch_add(1, Ordering::Relaxed);
                // A table that loads decides without panicking, and never rewrites twice.
                if let Some(rw) = c.table.decide(&image).rewrite() {
                    let target = rw.target.to_string();
                    prop_assert!(c.table.decide(&target).rewrite().is_none(), "{} -> {}", image, target);
                }
            }
            // Every problem is located in the file.
            Err(e) => prop_assert!(e.problems.iter().all(|p| p.file == "fuzz.yaml")),
        }
    });
    // Some of what is generated is a valid table, so decisions on loaded tables are exercised.
    assert!(loaded.load(Ordering::Relaxed) > 0);
}

// --- reviews -----------------------------------------------------------------------------------

fn json_value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        reference_like().prop_map(Value::String),
        "[a-z~/]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z/~]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A container: mostly well formed, sometimes not.
fn container() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (
            prop::option::of("[a-z0-9~/-]{1,8}"),
            prop_oneof![3 => common::strategies::valid_reference(), 1 => reference_like()],
        )
            .prop_map(|(n, i)| match n {
            Some(n) => json!({"name": n, "image": i}),
            None => json!({"image": i}),
        }),
        1 => json_value(2),
    ]
}

fn list(item: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::vec(item, 0..5).prop_map(Value::Array),
        1 => Just(Value::Null),
        1 => json_value(1),
    ]
}

/// AdmissionReviews of Pods of every shape the API server could send, and some it would not.
fn review_like() -> impl Strategy<Value = Value> {
    let secrets = list(prop_oneof![
        "[a-z-]{1,8}".prop_map(|n| json!({"name": n})),
        Just(json!({"name": "ghcr-pull"})),
        json_value(1),
    ]);
    let annotations = prop_oneof![
        Just(Value::Null),
        Just(json!({})),
        Just(json!({"image-mirror/original-images": "{\"c\":\"nginx\"}"})),
        Just(json!({"image-mirror/original-images": "not json"})),
        json_value(2),
    ];
    let spec = (list(container()), list(container()), list(container()), secrets).prop_map(
        |(c, i, e, s)| json!({"containers": c, "initContainers": i, "ephemeralContainers": e, "imagePullSecrets": s}),
    );
    let pod = (
        prop_oneof![3 => spec, 1 => json_value(2)],
        annotations,
        prop::option::of(Just(json!({"image-mirror/inject": "disabled"}))),
    )
        .prop_map(|(spec, annotations, labels)| {
            let mut metadata =
                json!({"name": "p", "namespace": "team-a", "annotations": annotations});
            if let Some(l) = labels {
                metadata["labels"] = l;
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
        });
    let operation = prop_oneof![
        4 => Just("CREATE"),
        2 => Just("UPDATE"),
        1 => Just("DELETE"),
        1 => Just("CONNECT"),
    ];
    let sub = prop_oneof![
        3 => Just(None),
        2 => Just(Some("ephemeralcontainers")),
        1 => Just(Some("status")),
    ];
    (pod.clone(), prop::option::of(pod), operation, sub, any::<bool>()).prop_map(
        |(object, old, operation, sub, dry_run)| {
            let mut request = json!({
                "uid": "fuzz", "operation": operation, "namespace": "team-a", "dryRun": dry_run,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "object": object,
            });
            if let Some(sub) = sub {
                request["subResource"] = json!(sub);
            }
            if let Some(old) = old {
                request["oldObject"] = old;
            }
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
        },
    )
}

fn tables() -> &'static [Table] {
    static TABLES: std::sync::OnceLock<Vec<Table>> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/admission/table.yaml"
        );
        vec![
            image_mirror_webhook::config::Config::embedded()
                .map(|c| c.table)
                .unwrap(),
            image_mirror_webhook::config::Config::parse(
                "table.yaml",
                &std::fs::read_to_string(dir).unwrap(),
            )
            .map(|c| c.table)
            .unwrap(),
        ]
    })
}

/// Decodes `body` as the webhook does; when it is a review, every table's patch must apply to
/// the Pod exactly as it was sent (not only to the pruned view).
fn check_review(body: &[u8], sent: Option<&Value>) -> Result<(), TestCaseError> {
    let Ok(review) = Review::parse(body) else {
        return Ok(());
    };
    REVIEWS.fetch_add(1, Ordering::Relaxed);
    for table in tables() {
        for presence in [Presence::Present, Presence::Absent, Presence::Unknown] {
            let p = plan(&review, table, &|_, secret| secret != "missing");
            let m = p.finish(&|_| presence);
            let out = response_body(&review.api_version, &review.request.uid, &m);
            prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
            if !m.patch.is_empty() {
                PATCHED.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(pod) = sent.and_then(|v| v["request"].get("object")) {
                let mut doc = pod.clone();
                let patch = json_patch::Patch(m.patch.clone());
                prop_assert!(
                    json_patch::patch(&mut doc, &patch).is_ok(),
                    "patch {:?} does not apply to {}",
                    m.patch,
                    pod
                );
            }
        }
    }
    Ok(())
}

#[test]
fn review_decoder_on_arbitrary_bytes() {
    proptest!(config(), |(b in bytes())| {
        check_review(&b, None)?;
    });
}

#[test]
fn review_decoder_on_review_shaped_input() {
    proptest!(config(), |(review in review_like())| {
        let body = serde_json::to_vec(&review).unwrap();
        check_review(&body, Some(&review))?;
    });
    // The generator reaches the interesting part: decoded reviews, and patches to apply.
    let (reviews, patched) = (
        REVIEWS.load(Ordering::Relaxed),
        PATCHED.load(Ordering::Relaxed),
    );
    assert!(
        reviews > cases() as usize / 2 && patched > cases() as usize / 20,
        "{reviews} reviews, {patched} patched"
    );
}

static REVIEWS: AtomicUsize = AtomicUsize::new(0);
static PATCHED: AtomicUsize = AtomicUsize::new(0);
