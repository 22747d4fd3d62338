//! Allocations per review (dhat's heap counts, with dhat as the allocator): a 3-container Pod,
//! a 50-container one, one in a namespace that is not opted in, and one with nothing to
//! rewrite. Counts, not times: `cargo bench --bench admission` has the times.

#[path = "support/shapes.rs"]
mod shapes;

use image_mirror_webhook::admission::Mode;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");
    let read = |name: &str| std::fs::read(format!("{dir}/{name}.json")).expect("fixture");
    let three = read("pod_three_containers");
    let fifty = shapes::with_containers(&three, 50);
    let (webhook, rt) = shapes::webhook();
    let cases = [
        ("3 containers", three.clone()),
        ("50 containers", fifty),
        ("not opted in", read("pod_in_excluded_namespace")),
        ("nothing to rewrite", read("pod_image_already_on_mirror")),
    ];
    const ROUNDS: u64 = 100;
    for (name, review) in &cases {
        // The first review fills the metric label sets; what repeats is measured.
        rt.block_on(webhook.review(review, Mode::Enforce));
        let before = dhat::HeapStats::get();
        for _ in 0..ROUNDS {
            std::hint::black_box(rt.block_on(webhook.review(review, Mode::Enforce)));
        }
        let after = dhat::HeapStats::get();
        println!(
            "{name:>20} ({:>6} bytes in): {:>5} allocations, {:>7} bytes per review",
            review.len(),
            (after.total_blocks - before.total_blocks) / ROUNDS,
            (after.total_bytes - before.total_bytes) / ROUNDS,
        );
    }
}
