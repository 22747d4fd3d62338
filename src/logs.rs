//! Log lines as Kubernetes components write them (structured logging, KEP-1602, klog's JSON
//! keys): `ts` (Unix seconds), `level`, `msg`, `logger` (the module), `err` for the error, keys
//! in lowerCamelCase, and a Pod named as `pod: {name, namespace}`. The text format uses the same
//! keys. No JSON line carries a key twice: collectors (jq, Loki, Elasticsearch) keep one of
//! two, and the other is lost.

use std::fmt::{self, Write as _};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `RUST_LOG` sets the level (default `info`), lines go to
/// standard error.
pub fn init(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    // The AWS SDK logs each credential failure as a warning with its whole debug dump; the
    // webhook says the same once, in one line with the identity tried. Its lines come back
    // when RUST_LOG names its crates.
    let spec = if spec.contains("aws_") {
        spec
    } else {
        format!("{spec},aws_config=error,aws_runtime=error,aws_smithy_runtime=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.event_format(KlogJson).try_init(),
        LogFormat::Text => builder
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(text_field).delimited(" "))
            .try_init(),
    };
}

/// A field's key as the logs spell it: lowerCamelCase, and `err` for the error.
pub fn key(name: &str) -> String {
    if name == "error" {
        return "err".to_string();
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// One field of a text line: `key=value` (a string value quoted and escaped, so that no value
/// can write a line of its own), the message as it is.
fn text_field(w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    if field.name() == "message" {
        write!(w, "{value:?}")
    } else {
        write!(w, "{}={value:?}", key(field.name()))
    }
}

/// klog's JSON line.
struct KlogJson;

impl<S, N> FormatEvent<S, N> for KlogJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut line: Vec<(String, Value)> = vec![
            ("ts".into(), Value::from(ts)),
            ("level".into(), Value::from(level(meta.level()))),
            (
                "msg".into(),
                Value::from(fields.message.take().unwrap_or_default()),
            ),
            ("logger".into(), Value::from(meta.target())),
        ];
        // A Pod is named as Kubernetes names objects.
        let pod = fields.take("pod");
        match (pod, fields.take("namespace")) {
            (Some(name), Some(namespace)) => {
                let mut obj = Map::new();
                obj.insert("name".into(), name);
                obj.insert("namespace".into(), namespace);
                line.push(("pod".into(), Value::Object(obj)));
            }
            (pod, namespace) => {
                fields.values.extend(pod.map(|v| ("pod".to_string(), v)));
                fields
                    .values
                    .extend(namespace.map(|v| ("namespace".to_string(), v)));
            }
        }
        for (k, v) in fields.values {
            // Never a key twice: one that would be is kept under another name.
            let mut k = k;
            while line.iter().any(|(have, _)| *have == k) {
                k.insert(0, '_');
            }
            line.push((k, v));
        }
        // Written by hand, in this order (ts, level, msg first), as klog writes them.
        let mut text = String::with_capacity(256);
        text.push('{');
        for (i, (k, v)) in line.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&Value::from(k.as_str()).to_string());
            text.push(':');
            text.push_str(&v.to_string());
        }
        text.push('}');
        writeln!(w, "{text}")
    }
}

fn level(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// An event's fields, keys as the logs spell them, in the order given.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    values: Vec<(String, Value)>,
}

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        let at = self.values.iter().position(|(k, _)| k == name)?;
        Some(self.values.remove(at).1)
    }

    fn put(&mut self, field: &Field, value: Value) {
        let k = key(field.name());
        match self.values.iter_mut().find(|(have, _)| *have == k) {
            Some(slot) => slot.1 = value,
            None => self.values.push((k, value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
        } else {
            self.put(field, Value::from(value));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
        } else {
            self.put(field, Value::from(text));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(crate::error::Report(value).to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lower_camel_case_and_the_error_is_err() {
        assert_eq!(key("duration_us"), "durationUs");
        assert_eq!(key("blobs_copied"), "blobsCopied");
        assert_eq!(key("error"), "err");
        assert_eq!(key("uid"), "uid");
    }
}
