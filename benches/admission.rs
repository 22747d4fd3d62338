//! Review → response: a 3-container Pod (target ≤ 8 µs), a 50-container one (≤ 12× that), one
//! in a namespace that is not opted in and one with nothing to rewrite (≤ 3 µs each).
//! `cargo bench --bench allocations` counts what each allocates.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use image_mirror_webhook::admission::{plan, response_body, Mode, Review, Webhook};
use image_mirror_webhook::config::{Config, ConfigHandle};
use image_mirror_webhook::metrics::Metrics;
use image_mirror_webhook::mirror::Presence;

#[path = "support/shapes.rs"]
mod shapes;

// The same allocator as the binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");
    let body = std::fs::read(format!("{dir}/pod_three_containers.json")).expect("fixture");
    let yaml = std::fs::read_to_string(format!("{dir}/table.yaml")).expect("table");
    let config = Config::parse("table.yaml", &yaml).expect("valid table");
    let table = config.table.clone();

    c.bench_function("admission/parse_only", |b| {
        b.iter(|| black_box(Review::parse(black_box(&body)).expect("review")))
    });
    let compact = shapes::compact(&body);
    c.bench_function("admission/parse_only_compact", |b| {
        b.iter(|| black_box(Review::parse(black_box(&compact)).expect("review")))
    });
    c.bench_function("admission/pure_3_containers", |b| {
        b.iter(|| {
            let review = Review::parse(black_box(&body)).expect("review");
            let plan = plan(&review, &table, &|_, _| true);
            let m = plan.finish(&|_| Presence::Unknown);
            black_box(response_body(&review.api_version, &review.request.uid, &m))
        })
    });

    let (metrics, _registry) = Metrics::new();
    let webhook = Webhook::new(ConfigHandle::new(config), metrics);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let fifty = shapes::with_containers(&body, 50);
    let excluded = std::fs::read(format!("{dir}/pod_in_excluded_namespace.json")).expect("fixture");
    let on_mirror =
        std::fs::read(format!("{dir}/pod_image_already_on_mirror.json")).expect("fixture");
    let cases: [(&str, &[u8]); 4] = [
        ("3_containers", &body),
        ("50_containers", &fifty),
        ("not_opted_in", &excluded),
        ("nothing_to_rewrite", &on_mirror),
    ];
    for (name, review) in cases {
        c.bench_function(&format!("admission/webhook_{name}"), |b| {
            b.iter(|| black_box(rt.block_on(webhook.review(black_box(review), Mode::Enforce))))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
