//! The pure rewrite core against the seeds' tables, the public grammar and generated input.

mod common;

use image_mirror_webhook::mapping::{
    CopyPolicy, Decision, KeepReasonKind, Matched, SwapPolicy, Table,
};
use image_mirror_webhook::Reference;
use proptest::prelude::*;
use serde::Deserialize;

const DIGEST: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

fn table_file(name: &str) -> Table {
    let path = format!("{}/deploy/config/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    image_mirror_webhook::config::Config::parse(&path, &text)
        .map(|c| c.table)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn target(table: &Table, image: &str) -> String {
    match table.decide(image) {
        Decision::Rewrite(rw) => rw.target.to_string(),
        Decision::Keep(k) => panic!("{image} kept: {}", k.reason),
    }
}

fn kept(table: &Table, image: &str) -> KeepReasonKind {
    match table.decide(image) {
        Decision::Keep(k) => k.reason.kind(),
        Decision::Rewrite(rw) => panic!("{image} rewritten to {}", rw.target),
    }
}

fn parse_err(yaml: &str) -> String {
    image_mirror_webhook::config::Config::parse("table.yaml", yaml)
        .map(|c| c.table)
        .unwrap_err()
        .to_string()
}

// --- the grammar ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Vector>,
}
#[derive(Deserialize)]
struct Vector {
    input: String,
    valid: bool,
    normalized: Option<String>,
}

fn check_vectors(file: &str) -> usize {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let vectors: Vectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in &vectors.cases {
        let got = Reference::parse(&case.input);
        assert_eq!(got.is_ok(), case.valid, "{:?}: {got:?}", case.input);
        if let (Ok(r), Some(want)) = (&got, &case.normalized) {
            assert_eq!(&r.to_string(), want, "{:?}", case.input);
        }
    }
    vectors.cases.len()
}

#[test]
fn shared_grammar_sample() {
    assert!(check_vectors("reference_vectors.json") >= 24);
    // CI lays shared/ beside the clone; when it is there, hold to its current copy too.
    let shared = format!(
        "{}/../shared/testdata/reference_vectors.json",
        env!("CARGO_MANIFEST_DIR")
    );
    if let Ok(text) = std::fs::read_to_string(shared) {
        let vectors: Vectors = serde_json::from_str(&text).unwrap();
        for case in vectors.cases {
            let got = Reference::parse(&case.input);
            assert_eq!(got.is_ok(), case.valid, "{:?}", case.input);
            if let (Ok(r), Some(want)) = (got, case.normalized) {
                assert_eq!(r.to_string(), want);
            }
        }
    }
}

#[test]
fn distribution_grammar_cases() {
    assert!(check_vectors("reference_vectors_distribution.json") >= 70);
}

// --- The GHCR runbook's mirrored images: the embedded default table ---------------------------

const SEED_000: &[(&str, &str)] = &[
    ("temporalio/server:1.29.1", "temporalio-server:1.29.1"),
    ("temporalio/ui:2.42.1", "temporalio-ui:2.42.1"),
    ("grafana/grafana:12.1.0", "grafana:12.1.0"),
    ("grafana/loki:3.5.7", "loki:3.5.7"),
    ("grafana/alloy:v1.11.3", "alloy:v1.11.3"),
    ("grafana/tempo:latest", "tempo:latest"),
    (
        "envoyproxy/envoy:distroless-v1.33.0",
        "envoy:distroless-v1.33.0",
    ),
    ("envoyproxy/gateway:v1.3.0", "envoy-gateway:v1.3.0"),
    ("redis:7.2.5", "redis:7.2.5"),
    ("redis:7.4.1", "redis:7.4.1"),
    (
        "clickhouse/clickhouse-server:25.10.2-alpine",
        "clickhouse-server:25.10.2-alpine",
    ),
    (
        "altinity/clickhouse-operator:0.25.5",
        "clickhouse-operator:0.25.5",
    ),
    (
        "altinity/metrics-exporter:0.25.5",
        "clickhouse-metrics-exporter:0.25.5",
    ),
    ("hashicorp/vault:1.21.0", "vault:1.21.0"),
    ("hashicorp/vault-k8s:1.4.1", "vault-k8s:1.4.1"),
    ("langfuse/langfuse:3.120.0", "langfuse:3.120.0"),
    (
        "langfuse/langfuse-worker:3.120.0",
        "langfuse-worker:3.120.0",
    ),
    ("plausible/analytics:v2.0.0", "plausible-analytics:v2.0.0"),
    ("postgres:16", "postgres:16"),
    ("library/busybox:1.36.1", "busybox:1.36.1"),
    ("curlimages/curl:8.9.1", "curl:8.9.1"),
    (
        "nginxinc/nginx-unprivileged:1.29-alpine",
        "nginx-unprivileged:1.29-alpine",
    ),
    ("bitnami/os-shell:latest", "bitnami-os-shell:latest"),
    ("bitnami/kubectl:latest", "bitnami-kubectl:latest"),
    ("kiwigrid/k8s-sidecar:1.30.10", "k8s-sidecar:1.30.10"),
    ("dpage/pgadmin4:8.7", "pgadmin4:8.7"),
    (
        "otel/opentelemetry-collector-contrib:0.91.0",
        "otel-collector-contrib:0.91.0",
    ),
];

#[test]
fn every_row_of_the_ghcr_runbook_through_the_default_table() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    assert_eq!(table.entries().len(), 28);
    for (source, short) in SEED_000 {
        // Every spelling of the source reaches the same entry.
        let explicit = Reference::parse(source).unwrap().to_string();
        for spelling in [
            source.to_string(),
            explicit.clone(),
            explicit.replacen("docker.io", "index.docker.io", 1),
        ] {
            let Decision::Rewrite(rw) = table.decide(&spelling) else {
                panic!("{spelling} not rewritten");
            };
            assert_eq!(
                rw.target.to_string(),
                format!("ghcr.io/ameideio/mirror/{short}")
            );
            assert_eq!(rw.pull_secret(), Some("ghcr-pull"));
            assert_eq!(rw.mirror_name(), "ghcr");
            assert_eq!(rw.policy.swap, SwapPolicy::Always);
            assert!(matches!(rw.matched, Matched::Entry(_)));
        }
    }
    // The tag-glob row carries the matched text over.
    for suffix in ["tctl", "alpine", "tctl-1.2"] {
        assert_eq!(
            target(&table, &format!("temporalio/admin-tools:1.29.1-{suffix}")),
            format!("ghcr.io/ameideio/mirror/temporalio-admin-tools:1.29.1-{suffix}")
        );
    }
}

#[test]
fn default_table_catch_all_is_if_present_with_on_demand_copies() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    let Decision::Rewrite(rw) = table.decide("nginx:1.27") else {
        panic!("nginx not rewritten");
    };
    assert_eq!(
        rw.target.to_string(),
        "ghcr.io/ameideio/mirror/docker.io/library/nginx:1.27"
    );
    assert_eq!(rw.policy.swap, SwapPolicy::IfPresent);
    assert_eq!(rw.policy.copy, CopyPolicy::OnDemand);
    // An entry's tag that does not match falls through to the rule.
    let Decision::Rewrite(rw) = table.decide("grafana/loki:9.9.9") else {
        panic!();
    };
    assert_eq!(rw.policy.swap, SwapPolicy::IfPresent);
    assert_eq!(
        kept(&table, "quay.io/minio/minio:latest"),
        KeepReasonKind::NoMatch
    );
    assert!(table.namespace_excluded("kube-system"));
    assert!(table.namespace_excluded("image-mirror-system"));
    assert!(!table.namespace_excluded("default"));
}

#[test]
fn tag_and_digest_are_both_kept() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    assert_eq!(
        target(&table, &format!("redis:7.2.5@{DIGEST}")),
        format!("ghcr.io/ameideio/mirror/redis:7.2.5@{DIGEST}")
    );
    assert_eq!(
        target(&table, &format!("nginx@{DIGEST}")),
        format!("ghcr.io/ameideio/mirror/docker.io/library/nginx@{DIGEST}")
    );
    // No `:latest` is added to an image that named no tag.
    assert_eq!(
        target(&table, "grafana/tempo"),
        "ghcr.io/ameideio/mirror/tempo"
    );
    assert_eq!(
        target(&table, "nginx"),
        "ghcr.io/ameideio/mirror/docker.io/library/nginx"
    );
}

#[test]
fn rewriting_is_idempotent_on_the_default_table() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    for (source, _) in SEED_000 {
        let once = target(&table, source);
        assert_eq!(
            kept(&table, &once),
            KeepReasonKind::AlreadyMirrored,
            "{once}"
        );
    }
    let once = target(&table, "bitnami/redis:7");
    assert_eq!(kept(&table, &once), KeepReasonKind::AlreadyMirrored);
}

#[test]
fn unparsable_images_are_kept_with_the_reason() {
    let table = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .unwrap();
    let Decision::Keep(k) = table.decide("docker/Docker") else {
        panic!()
    };
    assert_eq!(k.reason.kind(), KeepReasonKind::Unparsable);
    assert!(k.reason.to_string().contains("uppercase"));
    assert_eq!(kept(&table, ""), KeepReasonKind::Unparsable);
}

// --- The ECR pull-through runbook ------------------------------------------------------------

#[test]
fn the_ecr_pull_through_runbook() {
    let table = table_file("ecr-pull-through.yaml");
    let ecr = "123456789012.dkr.ecr.ca-central-1.amazonaws.com";
    let cases = [
        (
            "ghcr.io/amerintlxperts/my-app:v1.0.0",
            format!("{ecr}/ghcr/amerintlxperts/my-app:v1.0.0"),
        ),
        ("nginx:1.27", format!("{ecr}/docker-hub/library/nginx:1.27")),
        (
            "docker.io/library/nginx:1.27",
            format!("{ecr}/docker-hub/library/nginx:1.27"),
        ),
        (
            "bitnami/redis:7",
            format!("{ecr}/docker-hub/bitnami/redis:7"),
        ),
        (
            "quay.io/minio/minio:latest",
            format!("{ecr}/quay/minio/minio:latest"),
        ),
        (
            "registry.k8s.io/pause:3.10",
            format!("{ecr}/kubernetes/pause:3.10"),
        ),
    ];
    for (source, want) in &cases {
        let Decision::Rewrite(rw) = table.decide(source) else {
            panic!("{source}")
        };
        assert_eq!(&rw.target.to_string(), want);
        assert_eq!(rw.policy.swap, SwapPolicy::Always);
        assert_eq!(rw.policy.copy, CopyPolicy::Off);
        assert_eq!(rw.pull_secret(), None);
        assert_eq!(kept(&table, want), KeepReasonKind::AlreadyMirrored);
    }
    assert_eq!(
        kept(&table, "gcr.io/distroless/static"),
        KeepReasonKind::NoMatch
    );
}

#[test]
fn pull_through_upstream_without_cache_prefix_is_not_rewritten() {
    let table = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "mirrors:\n  ecr:\n    type: pull-through\n    registry: 1.dkr.ecr.us-east-1.amazonaws.com\n    upstreams: {docker.io: docker-hub}\nrules:\n  - match: [\"**\"]\n    mirror: ecr\n",
    ).map(|c| c.table)
    .unwrap();
    assert_eq!(kept(&table, "quay.io/a/b"), KeepReasonKind::NoCachePrefix);
    assert_eq!(
        target(&table, "nginx"),
        "1.dkr.ecr.us-east-1.amazonaws.com/docker-hub/library/nginx"
    );
}

// --- rancher/image-mirror naming ----------------------------------------------------------------

#[test]
fn rancher_image_mirror_naming() {
    let table = table_file("rancher.yaml");
    assert_eq!(
        target(&table, "banzaicloud/logging-operator:3.7.0"),
        "registry.example.com/rancher/mirrored-banzaicloud-logging-operator:3.7.0"
    );
    let Decision::Rewrite(rw) = table.decide("banzaicloud/logging-operator") else {
        panic!()
    };
    assert_eq!(rw.policy.platforms.len(), 2);
    assert_eq!(rw.pull_secret(), Some("rancher-pull"));
    // Official images live under library/, which the rule's */* covers.
    assert_eq!(
        target(&table, "nginx:1.27"),
        "registry.example.com/rancher/mirrored-library-nginx:1.27"
    );
}

// --- naming schemes and clashes -------------------------------------------------------------

fn one_mirror(naming: &str, glob: &str) -> Result<Table, String> {
    let yaml = format!(
        "mirrors:\n  m:\n    type: repository\n    registry: reg.example.com\n    prefix: mirror\n    naming: {naming}\nrules:\n  - name: r\n    match: [\"{glob}\"]\n    mirror: m\n"
    );
    image_mirror_webhook::config::Config::parse("t.yaml", &yaml)
        .map(|c| c.table)
        .map_err(|e| e.to_string())
}

#[test]
fn naming_schemes() {
    let cases = [
        (
            "flatten",
            "docker.io/grafana/*",
            "grafana/loki:3",
            "reg.example.com/mirror/loki:3",
        ),
        (
            "preserve",
            "docker.io/**",
            "grafana/loki:3",
            "reg.example.com/mirror/docker.io/grafana/loki:3",
        ),
        (
            "rancher",
            "docker.io/grafana/*",
            "grafana/loki:3",
            "reg.example.com/mirror/mirrored-grafana-loki:3",
        ),
        (
            "preserve",
            "**",
            "localhost:5000/a/b",
            "reg.example.com/mirror/localhost_5000/a/b",
        ),
        (
            "preserve",
            "quay.io/**",
            "quay.io/a/b/c:1",
            "reg.example.com/mirror/quay.io/a/b/c:1",
        ),
        (
            "rancher",
            "docker.io/library/*",
            "nginx",
            "reg.example.com/mirror/mirrored-library-nginx",
        ),
    ];
    for (naming, glob, source, want) in cases {
        let table = one_mirror(naming, glob).unwrap();
        assert_eq!(target(&table, source), want, "{naming} {source}");
        assert_eq!(kept(&table, want), KeepReasonKind::AlreadyMirrored);
    }
}

#[test]
fn clashing_namings_are_check_errors() {
    for (naming, glob) in [
        ("flatten", "docker.io/**"),
        ("flatten", "docker.io/*/loki"),
        ("rancher", "**"),
    ] {
        let err = one_mirror(naming, glob).unwrap_err();
        assert!(err.contains("naming clash"), "{naming} {glob}: {err}");
        assert!(err.starts_with("t.yaml:8: rules[0].match:"), "{err}");
    }
    for (naming, glob) in [
        ("preserve", "**"),
        ("flatten", "docker.io/grafana/*"),
        ("rancher", "docker.io/*/*"),
    ] {
        assert!(one_mirror(naming, glob).is_ok(), "{naming} {glob}");
    }
}

#[test]
fn two_entries_to_one_target_are_a_clash() {
    let err = parse_err(
        "images:\n  - source: a/x:1\n    target: reg.io/m/x:1\n  - source: b/x:1\n    target: reg.io/m/x:1\n",
    );
    assert!(err.contains("naming clash"), "{err}");
    assert!(err.starts_with("table.yaml:5: images[1].target:"), "{err}");
    // Any-tag entries overlap every tag of the same target name.
    let err = parse_err(
        "images:\n  - source: a/x\n    target: reg.io/m/x\n  - source: b/x:1\n    target: reg.io/m/x:1\n",
    );
    assert!(err.contains("naming clash"), "{err}");
    // Same target name, different tags: fine.
    assert!(image_mirror_webhook::config::Config::parse(
        "t",
        "images:\n  - source: a/x:1\n    target: reg.io/m/x:1\n  - source: b/x:2\n    target: reg.io/m/x:2\n"
    ).map(|c| c.table)
    .is_ok());
}

#[test]
fn flatten_rule_meeting_an_entry_target_is_a_clash() {
    let err = parse_err(
        "mirrors:\n  m:\n    type: repository\n    registry: reg.io\n    prefix: m\n    naming: flatten\nimages:\n  - source: grafana/loki\n    target: reg.io/m/loki\nrules:\n  - match: [\"docker.io/bitnami/*\"]\n    mirror: m\n",
    );
    assert!(err.contains("naming clash"), "{err}");
}

// --- configuration errors name file, line and field -------------------------------------------

#[test]
fn errors_name_file_line_and_field() {
    let cases = [
        ("mirrors:\n  m:\n    type: repository\n    registry: r.io\n    colour: red\n", "table.yaml:5: mirrors.m.colour: unknown field `colour`"),
        ("rules:\n  - match: [\"docker.io/**\"]\n    mirror: nope\n", "table.yaml:3: rules[0].mirror: unknown mirror \"nope\""),
        ("mirrors:\n  m: {type: repository, registry: r.io}\nrules:\n  - match: [\"docker.io/[\"]\n    mirror: m\n", "table.yaml:4: rules[0].match[0]: invalid glob"),
        ("images:\n  - source: Foo/Bar\n    target: r.io/x\n", "table.yaml:2: images[0].source: uppercase letter"),
        ("images:\n  - source: a:1-*\n    target: r.io/x:1\n", "table.yaml:3: images[0].target: the source tag is a glob"),
        ("checks:\n  presentTtl: forever\n", "table.yaml:2: checks.presentTtl: invalid duration"),
        ("mirrors:\n  m:\n    type: mirror-ish\n    registry: r.io\n", "table.yaml:3: mirrors.m.type: \"mirror-ish\" is not one of repository, pull-through"),
        ("rules:\n  - match: [\"docker.io/**\"]\n    mirror: m\n    swap: sometimes\n", "table.yaml:4: rules[0].swap: \"sometimes\" is not one of always, if-present"),
        ("copies: {concurrency: 0}\n", "table.yaml:1: copies.concurrency: must be between 1 and 64"),
        ("mirrors:\n  e:\n    type: pull-through\n    registry: r.io\n", "table.yaml:3: mirrors.e.upstreams: a pull-through mirror needs upstreams"),
        ("registries:\n  docker.io: {usernameEnv: U}\n", "table.yaml:2: registries.docker.io: usernameEnv and passwordEnv go together"),
        ("images:\n  - source: a:1\n    target: r.io/a:1\n  - source: docker.io/library/a:1\n    target: r.io/b:1\n", "table.yaml:4: images[1].source: duplicate source"),
        ("checks:\n  unknownTtl: soon\n", "table.yaml:2: checks.unknownTtl: invalid duration"),
        ("mirrors:\n  m:\n    type: repository\n    registry: r.io\n    pullSecretFrom: ns/src\n", "table.yaml:5: mirrors.m.pullSecretFrom: needs pullSecret"),
        ("mirrors:\n  m:\n    type: repository\n    registry: r.io\n    pullSecret: p\n    pullSecretFrom: just-a-name\n", "table.yaml:6: mirrors.m.pullSecretFrom: \"just-a-name\" is not namespace/name of a Secret"),
        ("mirrors:\n  m:\n    type: repository\n    registry: r.io\n    pullSecret: Ghcr_Pull\n", "table.yaml:5: mirrors.m.pullSecret: \"Ghcr_Pull\" is not a Secret name"),
        ("mirrors:\n  a: {type: repository, registry: r.io, prefix: a, pullSecret: p, pullSecretFrom: ns/one}\n  b:\n    type: repository\n    registry: r.io\n    prefix: b\n    pullSecret: p\n    pullSecretFrom: ns/two\n", "table.yaml:8: mirrors.b.pullSecretFrom: mirror a already provisions pullSecret \"p\" from another Secret"),
        ("checks:\n  circuitThreshold: 0\n", "table.yaml:2: checks.circuitThreshold: must be between 1 and 1000"),
        ("checks:\n  circuitBackoff: 10m\n  circuitMaxBackoff: 1m\n", "table.yaml:3: checks.circuitMaxBackoff: must not be shorter than circuitBackoff"),
        ("checks:\n  circuitBackoff: 10m\n", "table.yaml:2: checks.circuitMaxBackoff: must not be shorter than circuitBackoff"),
    ];
    for (yaml, want) in cases {
        let err = parse_err(yaml);
        assert!(err.starts_with(want), "got {err:?}\nwant {want:?}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "rules:\n  - match: [\"docker.io/library/a\"]\n    mirror: x\n  - match: [\"docker.io/library/b\"]\n    mirror: y\n",
    ).map(|c| c.table)
    .unwrap_err();
    assert_eq!(err.problems.len(), 2);
}

#[test]
fn docker_hub_spellings_in_rules_and_images() {
    let table = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "mirrors:\n  m: {type: repository, registry: r.io, prefix: m, naming: preserve}\nrules:\n  - match: [\"registry-1.docker.io/**\"]\n    mirror: m\n",
    ).map(|c| c.table)
    .unwrap();
    assert_eq!(target(&table, "nginx"), "r.io/m/docker.io/library/nginx");
    assert_eq!(
        target(&table, "index.docker.io/a/b"),
        "r.io/m/docker.io/a/b"
    );
    // containerd's endpoint spelling counts as Docker Hub too.
    assert_eq!(
        target(&table, "registry-1.docker.io/a/b"),
        "r.io/m/docker.io/a/b"
    );
}

#[test]
fn excludes_and_first_match_wins() {
    let table = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "mirrors:\n  a: {type: repository, registry: a.io, naming: preserve}\n  b: {type: repository, registry: b.io, naming: preserve}\nrules:\n  - name: first\n    match: [\"docker.io/**\"]\n    exclude: [\"docker.io/library/busybox\"]\n    mirror: a\n  - name: second\n    match: [\"docker.io/library/*\"]\n    mirror: b\n  - name: third\n    match: [\"docker.io/**\"]\n    mirror: b\n",
    ).map(|c| c.table)
    .unwrap();
    assert_eq!(target(&table, "nginx"), "a.io/docker.io/library/nginx");
    // Excluded by the first rule, picked up by the second.
    assert_eq!(target(&table, "busybox"), "b.io/docker.io/library/busybox");
    let only = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "mirrors:\n  a: {type: repository, registry: a.io, naming: preserve}\nrules:\n  - match: [\"docker.io/**\"]\n    exclude: [\"docker.io/library/busybox\"]\n    mirror: a\n",
    ).map(|c| c.table)
    .unwrap();
    assert_eq!(kept(&only, "busybox:1.36"), KeepReasonKind::Excluded);
}

#[test]
fn single_star_stays_within_a_component() {
    let table = one_mirror("preserve", "docker.io/grafana/*").unwrap();
    assert_eq!(kept(&table, "grafana/a/b"), KeepReasonKind::NoMatch);
    assert!(table.decide("grafana/a").rewrite().is_some());
}

#[test]
fn entry_policies_come_from_the_entry_then_the_mirror() {
    let table = image_mirror_webhook::config::Config::parse(
        "t.yaml",
        "mirrors:\n  m: {type: repository, registry: r.io, prefix: m, swap: if-present, pullSecret: s}\nimages:\n  - source: a:1\n    target: r.io/m/a:1\n  - source: b:1\n    target: r.io/m/b:1\n    swap: always\n  - source: c:1\n    target: other.io/c:1\n",
    ).map(|c| c.table)
    .unwrap();
    let policy = |img| table.decide(img).rewrite().unwrap().policy.swap;
    assert_eq!(policy("a:1"), SwapPolicy::IfPresent);
    assert_eq!(policy("b:1"), SwapPolicy::Always);
    assert_eq!(policy("c:1"), SwapPolicy::Always);
    assert_eq!(table.decide("c:1").rewrite().unwrap().pull_secret(), None);
    assert_eq!(
        table.decide("a:1").rewrite().unwrap().pull_secret(),
        Some("s")
    );
    // A target outside every mirror is still recognised as already mirrored.
    assert_eq!(
        kept(&table, "other.io/c:1"),
        KeepReasonKind::AlreadyMirrored
    );
}

#[test]
fn the_example_tables_load() {
    for name in ["ghcr.yaml", "ecr-pull-through.yaml", "rancher.yaml"] {
        table_file(name);
    }
}

// --- properties ---------------------------------------------------------------------------------

fn default_table() -> &'static Table {
    static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        image_mirror_webhook::config::Config::embedded()
            .map(|c| c.table)
            .unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decide_never_panics(s in "\\PC{0,300}") {
        let _ = default_table().decide(&s);
    }

    #[test]
    fn decide_never_panics_on_near_references(s in "[a-zA-Z0-9:/@._\\[\\]-]{0,80}") {
        let _ = default_table().decide(&s);
    }

    #[test]
    fn canonical_strings_reparse_to_themselves(s in common::strategies::valid_reference()) {
        if let Ok(r) = Reference::parse(&s) {
            let canonical = r.to_string();
            let again = Reference::parse(&canonical).unwrap();
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(again.to_string(), canonical);
            // The familiar form normalises back to the same reference, except where (as in
            // distribution) dropping `docker.io/` leaves a first component that looks like a host.
            let familiar = r.familiar();
            let first = familiar.split('/').next().unwrap_or_default();
            if !(familiar.contains('/') && (first.contains(['.', ':']) || first == "localhost")) || !r.is_docker_hub() {
                prop_assert_eq!(Reference::parse(&familiar).unwrap(), r);
            }
        }
    }

    #[test]
    fn rewriting_is_idempotent(s in common::strategies::valid_reference()) {
        static TABLES: std::sync::OnceLock<Vec<Table>> = std::sync::OnceLock::new();
        let tables = TABLES.get_or_init(|| vec![image_mirror_webhook::config::Config::embedded().map(|c| c.table).unwrap(), table_file("ecr-pull-through.yaml"), table_file("rancher.yaml")]);
        for table in tables {
            if let Decision::Rewrite(rw) = table.decide(&s) {
                let target = rw.target.to_string();
                prop_assert!(table.decide(&target).rewrite().is_none(), "{} -> {} rewrites again", s, target);
                prop_assert_eq!(rw.target.tag(), rw.source.tag().or(rw.target.tag()));
                prop_assert_eq!(rw.target.digest(), rw.source.digest());
            }
        }
    }
}
