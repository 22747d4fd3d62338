//! Review shapes the admission benches share.

/// The 3-container review with `n` containers (distinct names, the same three images).
pub fn with_containers(body: &[u8], n: usize) -> Vec<u8> {
    let mut review: serde_json::Value = serde_json::from_slice(body).expect("fixture");
    let spec = &mut review["request"]["object"]["spec"];
    let three = spec["containers"].as_array().expect("containers").clone();
    let containers: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut c = three[i % three.len()].clone();
            c["name"] = serde_json::Value::from(format!("c{i}"));
            c
        })
        .collect();
    spec["containers"] = serde_json::Value::from(containers);
    serde_json::to_vec(&review).expect("json")
}

/// `body` as compact JSON, as the API server sends a review.
#[allow(dead_code)] // Not every bench that shares these shapes uses this one.
pub fn compact(body: &[u8]) -> Vec<u8> {
    let review: serde_json::Value = serde_json::from_slice(body).expect("fixture");
    serde_json::to_vec(&review).expect("json")
}

/// The test table's webhook (metrics registered) and a current-thread runtime to drive it:
/// what every admission bench reviews with.
#[allow(dead_code)] // Not every bench that shares these shapes uses this one.
pub fn webhook() -> (
    image_mirror_webhook::admission::Webhook,
    tokio::runtime::Runtime,
) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");
    let yaml = std::fs::read_to_string(format!("{dir}/table.yaml")).expect("table");
    let config =
        image_mirror_webhook::config::Config::parse("table.yaml", &yaml).expect("valid table");
    let (metrics, _registry) = image_mirror_webhook::metrics::Metrics::new();
    let webhook = image_mirror_webhook::admission::Webhook::new(
        image_mirror_webhook::config::ConfigHandle::new(config),
        metrics,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    (webhook, rt)
}
