//! The command line: `serve`, `certs`, `explain`, `check-config`, `copy`, `sync` and
//! `export-policy`.
//!
//! Every `serve` flag also reads an environment variable, so the Deployment can set either.
//! `anyhow` lives here and in `main` only: each command turns its layer's errors into one
//! report, each cause printed once.

mod explain;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub use explain::{summary, Explanation};
pub use sync::{human_bytes, print_report, sync_all, sync_items, sync_one, SyncOutcome};

use crate::error::Report;
use crate::mapping::Platform;
use crate::settings::{parse_duration, ValueError};

#[derive(Debug, Parser)]
#[command(
    name = "image-mirror-webhook",
    version,
    about = "Rewrites Pod images to a mirror"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admission webhook over TLS, with metrics on a separate port.
    Serve(ServeArgs),
    /// Write a development CA and serving certificate, and print the caBundle.
    Certs(CertsArgs),
    /// Explain what each image reference would become, and why.
    Explain(ExplainArgs),
    /// Validate a mapping table: every problem, with file, line and field; warnings; or a
    /// summary of every setting in force.
    CheckConfig(CheckConfigArgs),
    /// Copy one image (every platform, or those chosen) between registries; into a pull-through
    /// cache of the table, warm it up instead (one pull through it).
    Copy(CopyArgs),
    /// Copy every exact entry of the table whose target is missing.
    Sync(SyncArgs),
    /// Print the static part of the table as a MutatingAdmissionPolicy and its binding
    /// (admissionregistration.k8s.io/v1); what cannot be exported is listed on stderr.
    ExportPolicy(ExportArgs),
    /// Print the MirroredImage CustomResourceDefinition (image-mirror.dev/v1alpha1), as
    /// deploy/components/mirrored-images holds it.
    Crd,
    /// Print the table's exact entries as declared MirroredImage objects, for `kubectl apply
    /// -f -`: the in-cluster form of a `sync` CronJob.
    Declare(DeclareArgs),
}

#[derive(Debug, clap::Args)]
pub struct DeclareArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often each image is checked upstream for a moved tag and copied again (e.g. 6h).
    #[arg(long)]
    pub refresh: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The table to check (or --config, or IMAGE_MIRROR_CONFIG).
    pub file: Option<PathBuf>,
    /// The table to check.
    #[arg(long, env = "IMAGE_MIRROR_CONFIG", conflicts_with = "file")]
    pub config: Option<PathBuf>,
    /// Refuse a table with warnings too (valid, but probably not what was meant).
    #[arg(long)]
    pub strict: bool,
    /// Also ask AWS, with this machine's AWS identity, whether every pull-through prefix of
    /// the table has its cache rule (DescribePullThroughCacheRules).
    #[arg(long)]
    pub online: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of the policy and of its binding.
    #[arg(long, default_value = "image-mirror")]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The image to copy, as written in a Pod spec (e.g. nginx:1.27).
    pub source: String,
    /// Where to put it (e.g. ghcr.io/acme/mirror/nginx:1.27).
    pub target: String,
    /// Copy only this platform (os/arch[/variant]); repeat for more. Default: all.
    #[arg(long = "platform", value_parser = Platform::parse)]
    pub platforms: Vec<Platform>,
    /// Leave signatures, attestations, SBOMs and OCI referrers behind.
    #[arg(long)]
    pub no_referrers: bool,
    /// Mapping table whose `registries` settings give credentials, CAs and insecure hosts.
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Skip TLS verification for this registry (HOST:PORT), or use plain HTTP when it does not
    /// speak TLS, as skopeo's --tls-verify=false does; repeat for more.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// How long `copy` and `sync` wait on a registry; each defaults to the table's `timeouts`.
#[derive(Debug, Clone, clap::Args)]
pub struct TimeoutArgs {
    /// Longest wait for a connection to a registry [default: the table's timeouts.connect, 5s].
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub connect_timeout: Option<std::time::Duration>,
    /// Longest wait for a registry's answer to a request (a manifest, a check, the headers of a
    /// blob) [default: timeouts.response, 10s]. A request that gets none is tried once more.
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub response_timeout: Option<std::time::Duration>,
    /// Longest silence while a blob streams up or down (a big layer may take minutes; a silent
    /// socket must not) [default: timeouts.idle, 30s].
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub idle_timeout: Option<std::time::Duration>,
}

impl TimeoutArgs {
    /// The table's timeouts with these flags over them.
    pub fn over(&self, table: crate::settings::Timeouts) -> crate::settings::Timeouts {
        crate::settings::Timeouts {
            connect: self.connect_timeout.unwrap_or(table.connect),
            response: self.response_timeout.unwrap_or(table.response),
            idle: self.idle_timeout.unwrap_or(table.idle),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also re-copy tags whose upstream digest moved.
    #[arg(long)]
    pub refresh: bool,
    /// Only say what would be copied.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave signatures, attestations, SBOMs and OCI referrers behind, whatever the table says.
    #[arg(long)]
    pub no_referrers: bool,
    /// Skip TLS verification for this registry (HOST:PORT), or use plain HTTP when it does not
    /// speak TLS, as skopeo's --tls-verify=false does; repeat for more.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTPS admission endpoint.
    #[arg(long, env = "IMAGE_MIRROR_LISTEN", default_value = crate::server::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// Address of the plain-HTTP metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "IMAGE_MIRROR_METRICS_LISTEN", default_value = crate::server::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
    /// Serving certificate (PEM); give --tls-key with it. Default: certs/tls.crt, made with a
    /// development CA when absent (never in a cluster).
    #[arg(long, env = "IMAGE_MIRROR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serving key (PEM); give --tls-cert with it. Default: certs/tls.key.
    #[arg(long, env = "IMAGE_MIRROR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM) on the admission port: the API
    /// server's, as its AdmissionConfiguration's kubeConfigFile names it. Probes then use the
    /// metrics port. Default: any caller may connect.
    #[arg(long, env = "IMAGE_MIRROR_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Mapping table (YAML). Default: the embedded table.
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text, or JSON lines with klog's keys (ts, level, msg, err); RUST_LOG sets the
    /// level.
    #[arg(long, env = "IMAGE_MIRROR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Time budget of one review; past it the Pod is admitted unchanged.
    #[arg(long, env = "IMAGE_MIRROR_ADMISSION_BUDGET", default_value = "2s", value_parser = duration)]
    pub admission_budget: std::time::Duration,
    /// On SIGTERM, how long /readyz reports unready before draining starts.
    #[arg(long, env = "IMAGE_MIRROR_SHUTDOWN_DELAY", default_value = "5s", value_parser = duration)]
    pub shutdown_delay: std::time::Duration,
    /// How long in-flight requests may take to finish while draining.
    #[arg(long, env = "IMAGE_MIRROR_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub drain_timeout: std::time::Duration,
    /// Refuse a Pod instead of admitting it unchanged on an internal error, an unknown mirror
    /// state (slow or failing registry) or an unparsable image. Off by default.
    #[arg(long, env = "IMAGE_MIRROR_STRICT", value_parser = strict_flag, num_args = 0..=1,
        default_value = "false", default_missing_value = "true", value_name = "BOOL")]
    pub strict: bool,
    /// Use the Kubernetes API (in-cluster, or KUBECONFIG): pull secrets checked and provisioned,
    /// copy Jobs, the namespaces a metric may name. `auto` when a client configuration is there,
    /// `off` never.
    #[arg(long, env = "IMAGE_MIRROR_KUBERNETES", value_enum, default_value_t = crate::cluster::Access::Auto)]
    pub kubernetes: crate::cluster::Access,
    /// `enforce`: patch Pods; `report`: decide everything, patch nothing, and say what would
    /// change (warnings, audit annotations, metrics). `/report` always reports.
    #[arg(long, env = "IMAGE_MIRROR_MODE", value_enum, default_value_t = ModeArg::Enforce)]
    pub mode: ModeArg,
    /// Memory the reviews in flight may hold, in MiB (their bodies, twice over), half of it
    /// kept for reviews under 500 KiB; past it a review is answered 429 at once, and the API
    /// server admits the Pod as its failurePolicy says. Keep it well under the container's
    /// memory limit; from 16 up, the largest body allowed (3 MiB) fits.
    #[arg(long, env = "IMAGE_MIRROR_MAX_IN_FLIGHT_MIB", default_value_t = crate::server::DEFAULT_IN_FLIGHT_MIB,
        value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub max_in_flight_mib: u32,
    /// This replica's Pod, from the downward API: the model of copy Jobs, and its name in the
    /// Events it records (else the host's name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The webhook's namespace, from the downward API: where copy Jobs go (else the Kubernetes
    /// client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

/// `--mode`, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Patch Pods.
    Enforce,
    /// Decide everything, patch nothing, and say what would change.
    Report,
}

impl From<ModeArg> for crate::admission::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Enforce => crate::admission::Mode::Enforce,
            ModeArg::Report => crate::admission::Mode::Report,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory for ca.crt, ca.key, tls.crt and tls.key.
    #[arg(long, default_value = DEFAULT_CERT_DIR)]
    pub out: PathBuf,
    /// Names of the serving certificate: DNS names, and IP addresses (they go into IP SANs);
    /// several after one flag, the flag repeated, or comma-separated. Default: localhost,
    /// 127.0.0.1, ::1 and the in-cluster Service names.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    pub dns: Vec<String>,
    /// Days the serving certificate is valid, from now.
    #[arg(long, default_value_t = crate::certs::SERVING_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Days a new CA is valid, from now (a CA already in --out is kept as it is).
    #[arg(long, default_value_t = crate::certs::CA_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub ca_days: u32,
    /// Make a new CA even when --out has one (every caBundle made from the old one must then
    /// be replaced).
    #[arg(long)]
    pub force: bool,
}

/// Where `serve` looks for (and `certs` writes) development certificates.
pub const DEFAULT_CERT_DIR: &str = "certs";

fn duration(s: &str) -> Result<std::time::Duration, ValueError> {
    parse_duration(s)
}

/// A boolean's value, from its flag or its variable (`IMAGE_MIRROR_STRICT=1`): the usual
/// spellings, and an error that names both, since either may have given it.
fn boolean(s: &str, flag: &str, variable: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" | "y" | "t" => Ok(true),
        "false" | "no" | "off" | "0" | "n" | "f" | "" => Ok(false),
        _ => Err(format!(
            "{s:?} is not a boolean for {flag} or {variable}: write true or false (also yes/no, \
             on/off, 1/0)"
        )),
    }
}

fn strict_flag(s: &str) -> Result<bool, String> {
    boolean(s, "--strict", "IMAGE_MIRROR_STRICT")
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// How to print: text for people, json (one object per image) for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Image references, as written in a Pod spec.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Runs a command and maps its outcome to the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(args) => certs(&args),
        Command::Explain(args) => explain::explain(&args),
        Command::CheckConfig(args) => explain::check_config(&args),
        Command::Copy(args) => sync::copy(&args),
        Command::Sync(args) => sync::sync(&args),
        Command::ExportPolicy(args) => explain::export_policy(&args),
        Command::Crd => explain::crd(),
        Command::Declare(args) => explain::declare(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", Report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    crate::logs::init(match format {
        LogFormat::Text => crate::logs::LogFormat::Text,
        LogFormat::Json => crate::logs::LogFormat::Json,
    });
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format);
    // Everything is checked before anything is made: a broken table writes no certificates.
    let config = crate::config::ConfigHandle::open(args.config.as_deref())?;
    let mut tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => crate::tls::TlsFiles {
            cert,
            key,
            client_ca: None,
        },
        _ => development_certificates()?,
    };
    tls.client_ca = args.client_ca;
    let opts = crate::app::ServeOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls,
        config: args.config,
        budget: args.admission_budget,
        shutdown_delay: args.shutdown_delay,
        drain_timeout: args.drain_timeout,
        strict: args.strict,
        kubernetes: args.kubernetes,
        mode: args.mode.into(),
        max_in_flight_mib: args.max_in_flight_mib,
        instance: args
            .pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "image-mirror-webhook".to_string()),
        pod_name: args.pod_name,
        pod_namespace: args.pod_namespace,
    };
    let runtime = runtime()?;
    runtime.block_on(async move {
        let mirrors = crate::app::Mirrors::Registries(crate::registry::RegistryOptions::default());
        let running = crate::app::start_with(opts, config, mirrors).await?;
        running.run_until_signal().await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The development certificates in `certs/`, made now when they are not there. Never in a
/// cluster: a serving-certificate Secret that is not mounted must stop `serve`, not end in a
/// silently self-signed server.
fn development_certificates() -> anyhow::Result<crate::tls::TlsFiles> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        anyhow::bail!(
            "no --tls-cert and --tls-key (IMAGE_MIRROR_TLS_CERT, IMAGE_MIRROR_TLS_KEY) given, and \
             this runs in a Kubernetes cluster: mount the serving certificate Secret and name its \
             files; development certificates are never made in a cluster"
        );
    }
    let dir = PathBuf::from(DEFAULT_CERT_DIR);
    let files = crate::tls::TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_ca: None,
    };
    if files.cert.exists() && files.key.exists() {
        tracing::warn!(dir = %dir.display(),
            "no --tls-cert/--tls-key: serving with the development certificates made earlier");
    } else {
        let opts = crate::certs::CertOptions::default();
        let (certs, ca) = crate::certs::DevCerts::in_dir(&dir, &opts, false)?;
        certs.write(&dir)?;
        tracing::warn!(dir = %dir.display(), new_ca = ca == crate::certs::Ca::Made,
            "no --tls-cert/--tls-key: made development certificates (signed by the CA in that \
             directory) and serving with them; for development only");
    }
    Ok(files)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    let mut opts = crate::certs::CertOptions {
        days: args.days,
        ca_days: args.ca_days,
        ..Default::default()
    };
    if !args.dns.is_empty() {
        opts = opts.with_names(&args.dns)?;
    }
    let (certs, ca) = crate::certs::DevCerts::in_dir(&args.out, &opts, args.force)?;
    certs.write(&args.out)?;
    let dir = args.out.display();
    let day = |t: time::OffsetDateTime| t.date().to_string();
    match ca {
        crate::certs::Ca::Made => eprintln!(
            "made a new CA: {dir}/ca.crt and {dir}/ca.key, valid until {}",
            certs.ca_not_after.map(day).unwrap_or_default()
        ),
        crate::certs::Ca::Kept => eprintln!(
            "kept the CA in {dir}/ca.crt (--force makes a new one); caBundles made from it stay \
             good"
        ),
    }
    let names: Vec<String> = opts
        .dns
        .iter()
        .cloned()
        .chain(opts.ips.iter().map(|ip| ip.to_string()))
        .collect();
    eprintln!(
        "wrote {dir}/tls.crt and {dir}/tls.key for {}, valid until {}",
        names.join(", "),
        day(certs.not_after)
    );
    eprintln!("caBundle for the MutatingWebhookConfiguration:");
    println!("{}", certs.ca_bundle());
    Ok(ExitCode::SUCCESS)
}
