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
