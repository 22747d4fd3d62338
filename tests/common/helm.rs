//! The Helm chart (deploy/helm/image-mirror-webhook) through Helm's own Go SDK: helm-python-sdk
//! binds it, and tests/tools/helm_sdk.py runs one SDK call per command.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Pinned: the SDK is alpha, and its Helm (v4.2.3) is part of what is tested.
pub const SDK: &str = "helm-python-sdk==0.2.2";

pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/image-mirror-webhook")
}

/// One SDK call: its JSON answer, or Helm's error.
pub fn helm(args: &[&str]) -> Result<Value, String> {
    let python = super::python::python(&[SDK]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/helm_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        // Helm's Go logger writes INFO lines about the chart's symlinked files; the error is
        // the script's own last line.
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(stderr.lines().last().unwrap_or_default().to_string())
    }
}

/// The chart at `chart` rendered for an install with `values` into `namespace`: every object,
/// NOTES.txt apart.
pub fn render_at(chart: &Path, values: &Value, namespace: &str) -> Result<Vec<Value>, String> {
    let files = helm(&[
        "render",
        chart.to_str().unwrap(),
        &values.to_string(),
        namespace,
    ])?;
    let mut objects = Vec::new();
    let files = files.as_object().unwrap();
    for (path, text) in files {
        if path.ends_with("NOTES.txt") {
            continue;
        }
        let docs: Vec<Value> = serde_saphyr::from_multiple(text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{path} is not YAML: {e}\n{text}"));
        objects.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    Ok(objects)
}

pub fn render(values: &Value, namespace: &str) -> Result<Vec<Value>, String> {
    render_at(&chart(), values, namespace)
}

/// NOTES.txt as rendered for `values`.
pub fn notes(values: &Value, namespace: &str) -> String {
    let files = helm(&[
        "render",
        chart().to_str().unwrap(),
        &values.to_string(),
        namespace,
    ])
    .unwrap();
    let (_, text) = files
        .as_object()
        .unwrap()
        .iter()
        .find(|(path, _)| path.ends_with("NOTES.txt"))
        .expect("the chart has NOTES.txt");
    text.as_str().unwrap().to_string()
}
