use std::process::ExitCode;

use clap::Parser;
use image_mirror_webhook::cli::{run, Cli};

// Admission is allocation-heavy JSON work; mimalloc measurably shortens it (benches/admission.rs).
// Its arenas are committed on demand (.cargo/config.toml), so freed memory leaves the RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // oci-client and our TLS listener both use rustls; install one provider before any use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    run(Cli::parse())
}
