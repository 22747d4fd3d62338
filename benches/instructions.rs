//! Instructions per review, counted by valgrind's cachegrind: exact and the same on every run,
//! where times on a shared 2-core VM drift by ±30 % (`cargo bench --bench admission` has the
//! times). Each shape runs 0 and 200 reviews under cachegrind; the difference over 200 is one
//! review's instructions, setup and first-review label sets excluded. Needs `valgrind`
//! (Debian: valgrind).

#[path = "support/shapes.rs"]
mod shapes;

use std::process::Command;

use image_mirror_webhook::admission::Mode;

// The same allocator as the binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUNDS: u64 = 200;
/// Each as the fixture has it (pretty-printed), and as the API server sends it (compact JSON,
/// Go's encoding/json): indentation alone is a third of a small review's bytes.
const SHAPES: [&str; 8] = [
    "3 containers",
    "50 containers",
    "not opted in",
    "nothing to rewrite",
    "3 containers, compact",
    "50 containers, compact",
    "not opted in, compact",
    "nothing to rewrite, compact",
];

fn review_of(shape: &str) -> Vec<u8> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");
    let read = |name: &str| std::fs::read(format!("{dir}/{name}.json")).expect("fixture");
    if let Some(shape) = shape.strip_suffix(", compact") {
        return shapes::compact(&review_of(shape));
    }
    match shape {
        "3 containers" => read("pod_three_containers"),
        "50 containers" => shapes::with_containers(&read("pod_three_containers"), 50),
        "not opted in" => read("pod_in_excluded_namespace"),
        _ => read("pod_image_already_on_mirror"),
    }
}

/// Under cachegrind: one shape, `rounds` reviews after a first one.
fn run(shape: &str, rounds: u64) {
    let (webhook, rt) = shapes::webhook();
    let review = review_of(shape);
    rt.block_on(webhook.review(&review, Mode::Enforce));
    for _ in 0..rounds {
        std::hint::black_box(
            rt.block_on(webhook.review(std::hint::black_box(&review), Mode::Enforce)),
        );
    }
}

/// The instructions cachegrind counted for this binary with `shape` and `rounds`.
fn counted(shape: &str, rounds: u64) -> u64 {
    let me = std::env::current_exe().expect("own path");
    let out = Command::new("valgrind")
        .args([
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
        ])
        .arg(me)
        .env("IMW_INSTRUCTIONS_SHAPE", shape)
        .env("IMW_INSTRUCTIONS_ROUNDS", rounds.to_string())
        .output()
        .expect("valgrind is installed (apt-get install valgrind)");
    let said = String::from_utf8_lossy(&out.stderr);
    said.lines()
        .filter(|l| l.contains("I   refs:") || l.contains("I refs:"))
        .find_map(|l| {
            l.split_once("refs:")
                .map(|(_, n)| n.trim().replace(',', ""))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no instruction count from cachegrind:\n{said}"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(shape) = std::env::var("IMW_INSTRUCTIONS_SHAPE") {
        let rounds = std::env::var("IMW_INSTRUCTIONS_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        return run(&shape, rounds);
    }
    for shape in SHAPES {
        let base = counted(shape, 0);
        let total = counted(shape, ROUNDS);
        println!(
            "{shape:>29} ({:>6} bytes in): {:>9} instructions per review",
            review_of(shape).len(),
            (total - base) / ROUNDS
        );
    }
}
