//! Property-test input shared by the grammar's properties (`tests/mapping.rs`) and the fuzz
//! runs (`tests/fuzz.rs`).

use proptest::prelude::*;

/// References the grammar accepts, under the spellings Pods use: no host, Docker Hub's three,
/// a mirror path, hosts with ports (IPv6 too), any tag, an optional digest.
pub fn valid_reference() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        Just(String::new()),
        Just("docker.io/".to_string()),
        Just("index.docker.io/".to_string()),
        Just("registry-1.docker.io/".to_string()),
        Just("quay.io/".to_string()),
        Just("localhost:5000/".to_string()),
        Just("[::1]:5000/".to_string()),
        Just("ghcr.io/ameideio/mirror/".to_string()),
        "[a-z]{1,6}\\.[a-z]{2,3}(:[0-9]{2,5})?/",
    ];
    let component = "[a-z0-9]{1,8}([._-][a-z0-9]{1,6}){0,2}";
    let path = prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"));
    let tag = prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}");
    let digest = prop::option::of("[a-f0-9]{64}");
    (host, path, tag, digest).prop_map(|(h, p, t, d)| {
        let mut s = format!("{h}{p}");
        if let Some(t) = t {
            s.push(':');
            s.push_str(&t);
        }
        if let Some(d) = d {
            s.push_str("@sha256:");
            s.push_str(&d);
        }
        s
    })
}
