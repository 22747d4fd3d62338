//! `decide` on the embedded table and on a generated table of 100,000 exact entries and 1,000
//! rules. Target: ≤ 2 µs per image on both, the large table ≤ 1.2× the small one.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use image_mirror_webhook::mapping::Table;

/// Images that exercise each path: exact entry, tag glob, catch-all rule, no match, already
/// mirrored, unparsable.
const IMAGES: &[&str] = &[
    "grafana/loki:3.5.7",
    "temporalio/admin-tools:1.29.1-tctl",
    "nginx:1.27",
    "quay.io/prometheus/node-exporter:v1.8.2",
    "ghcr.io/ameideio/mirror/loki:3.5.7",
    "docker/Docker",
];

fn large_table() -> Table {
    let mut y = String::from(
        "mirrors:\n  ghcr:\n    type: repository\n    registry: ghcr.io\n    prefix: ameideio/mirror\n    naming: preserve\n    pullSecret: ghcr-pull\nimages:\n",
    );
    for i in 0..100_000 {
        let _ = write!(
            y,
            "  - source: org{}/image{i}:1.{i}\n    target: ghcr.io/ameideio/mirror/org{}-image{i}:1.{i}\n",
            i % 997,
            i % 997
        );
    }
    // The seed's own rows, so the same images hit entries in both tables.
    let default = image_mirror_webhook::mapping::DEFAULT_TABLE_YAML;
    let seed_rows: String = default
        .lines()
        .skip_while(|l| !l.starts_with("images:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| format!("{l}\n"))
        .collect();
    y.push_str(&seed_rows);
    y.push_str("rules:\n");
    for i in 0..999 {
        let _ = write!(
            y,
            "  - name: r{i}\n    match: [\"registry{i}.example.com/team{i}/**\", \"quay.io/org{i}/*\"]\n    exclude: [\"registry{i}.example.com/team{i}/secret\"]\n    mirror: ghcr\n"
        );
    }
    y.push_str("  - name: docker-hub\n    match: [\"docker.io/**\"]\n    mirror: ghcr\n    swap: if-present\n");
    image_mirror_webhook::config::Config::parse("generated", &y)
        .map(|c| c.table)
        .expect("generated table is valid")
}

fn bench(c: &mut Criterion) {
    let small = image_mirror_webhook::config::Config::embedded()
        .map(|c| c.table)
        .expect("embedded table");
    let large = large_table();
    assert_eq!(large.entries().len(), 100_028);
    assert_eq!(large.rules().len(), 1_000);
    c.bench_function("reference/parse", |b| {
        b.iter(|| {
            black_box(image_mirror_webhook::Reference::parse(black_box(
                "ghcr.io/ameideio/mirror/loki:3.5.7",
            )))
        })
    });
    let mut group = c.benchmark_group("decide");
    for (name, table) in [("default", &small), ("100k_entries_1k_rules", &large)] {
        group.bench_function(format!("{name}/mix_of_6"), |b| {
            b.iter(|| {
                for image in IMAGES {
                    black_box(table.decide(black_box(image)));
                }
            })
        });
        for image in IMAGES {
            group.bench_function(format!("{name}/{image}"), |b| {
                b.iter(|| black_box(table.decide(black_box(image))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
