//! A real kube-apiserver and etcd on loopback, from `KUBEBUILDER_ASSETS` (the envtest
//! convention; `.ci/run` sets it from `../shared/envtest/setup.sh`), with certificates made for
//! the run; and the webhook binary run against it as the ServiceAccount from `deploy/`, with a
//! token from `kubectl create token`, so that the RBAC in `deploy/` is what gets tested.
//!
//! One API server serves every test of a test binary (it takes seconds to start); tests keep
//! apart by namespace, by pull secret name and by their own MutatingWebhookConfiguration. The
//! processes die with the test binary (`PR_SET_PDEATHSIG`, from a thread that never ends).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image_mirror_webhook::certs::DevCerts;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};

use super::free_port;

/// The directory with `kube-apiserver` and `etcd`, or why the Kubernetes tests are skipped.
pub fn assets() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KUBEBUILDER_ASSETS").ok_or_else(|| {
        "KUBEBUILDER_ASSETS is not set (export KUBEBUILDER_ASSETS=$(../shared/envtest/setup.sh target/envtest))"
            .to_string()
    })?;
    let dir = PathBuf::from(dir);
    for b in ["kube-apiserver", "etcd"] {
        if !dir.join(b).exists() {
            return Err(format!("KUBEBUILDER_ASSETS={} has no {b}", dir.display()));
        }
    }
    Ok(dir)
}

/// The shared API server; `None` (after one line on stderr) when there is none to be had.
pub fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| match assets() {
            Ok(dir) => Some(Cluster::start(&dir)),
            Err(why) => {
                eprintln!("Kubernetes end-to-end tests skipped: {why}");
                None
            }
        })
        .as_ref()
}

/// Spawns `cmd` from a thread that never ends, with the kernel told to kill the child when
/// that thread (so, this process) goes away.
pub fn spawn_tied(mut cmd: Command) -> Child {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // The channel lives as long as the process: this line is never reached.
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    keeper.lock().unwrap().send((cmd, tx)).unwrap();
    rx.recv().unwrap().expect("process starts")
}

/// Tests that run webhooks with pull secret controllers take turns: the RBAC of `deploy/`
/// allows one Secret name, so their controllers would all act on every opted-in namespace.
pub async fn take_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// etcd and kube-apiserver on free loopback ports, with an admin kubeconfig.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin: PathBuf,
    _etcd: Child,
    _apiserver: Child,
}

pub fn signed(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    org: Option<&str>,
    server: bool,
) -> (String, String) {
    let mut p = CertificateParams::new(if server {
        vec!["localhost".to_string()]
    } else {
        Vec::new()
    })
    .unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    if server {
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Cluster {
    fn start(assets: &Path) -> Cluster {
        super::init();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "envtest CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let (srv, srv_key) = signed(&issuer, "kube-apiserver", None, true);
        let (admin, admin_key) = signed(&issuer, "admin", Some("system:masters"), false);
        let sa = KeyPair::generate().unwrap();
        for (f, text) in [
            ("ca.crt", ca_cert.pem()),
            ("srv.crt", srv),
            ("srv.key", srv_key),
            ("admin.crt", admin.clone()),
            ("admin.key", admin_key.clone()),
            ("sa.pub", sa.public_key_pem()),
            ("sa.key", sa.serialize_pem()),
            // Pods at Metadata level: enough for the annotations admission adds.
            (
                "audit.yaml",
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n    resources: [{group: \"\", resources: [pods]}]\n  - level: None\n".to_string(),
            ),
        ] {
            std::fs::write(d.join(f), text).unwrap();
        }
        let (client_port, peer_port, secure_port) = (free_port(), free_port(), free_port());
        let mut etcd = Command::new(assets.join("etcd"));
        etcd.arg("--data-dir")
            .arg(d.join("etcd"))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .args([
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--log-level=error",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).unwrap());
        let etcd = spawn_tied(etcd);
        let mut api = Command::new(assets.join("kube-apiserver"));
        api.args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={secure_port}"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .arg(format!("--tls-cert-file={}", d.join("srv.crt").display()))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("srv.key").display()
            ))
            .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!(
                "--audit-policy-file={}",
                d.join("audit.yaml").display()
            ))
            .arg(format!(
                "--audit-log-path={}",
                d.join("audit.log").display()
            ))
            .args([
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--profiling=false",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log")).unwrap());
        let apiserver = spawn_tied(api);
        let url = format!("https://127.0.0.1:{secure_port}");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
            "clusters": [{"name": "envtest", "cluster": {"server": url, "certificate-authority-data": b64(&ca_cert.pem())}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": b64(&admin), "client-key-data": b64(&admin_key)}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "admin"}}],
        });
        let admin_path = d.join("admin.kubeconfig");
        std::fs::write(&admin_path, serde_json::to_vec_pretty(&kubeconfig).unwrap()).unwrap();
        let cluster = Cluster {
            url,
            admin: admin_path,
            _etcd: etcd,
            _apiserver: apiserver,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = cluster.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the API server did not become ready: {}",
                std::fs::read_to_string(cluster.dir.path().join("apiserver.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        cluster
    }

    /// The audit events (JSON lines) the API server wrote for `namespace/name` Pods.
    pub fn audit_events(&self, namespace: &str, name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["objectRef"]["resource"] == "pods"
                    && e["objectRef"]["namespace"] == namespace
                    && e["objectRef"]["name"] == name
            })
            .collect()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.crt")).unwrap()
    }

    /// `kubectl` as the cluster admin (stdout only is worth parsing: kubectl 1.32 warns about
    /// the version skew on stderr).
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.kubectl_as(&self.admin, args, None)
    }

    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> std::process::Output {
        let mut cmd = Command::new("kubectl");
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args);
        super::output_with_input(&mut cmd, stdin).expect("kubectl is on the machine")
    }

    /// `kubectl` as admin that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `kubectl apply -f -` as admin.
    pub fn apply(&self, manifest: &str) {
        let out = self.kubectl_as(&self.admin, &["apply", "-f", "-"], Some(manifest));
        assert!(
            out.status.success(),
            "apply: {}\n{manifest}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An object as JSON, or `None` when it does not exist.
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
        let out = self.kubectl(&a);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The objects `deploy/` installs for the webhook's identity and rights (namespace,
    /// ServiceAccount, roles and bindings, and the policy fencing its Secret writes), from
    /// `kubectl kustomize` of `overlay`, applied once.
    pub fn install_rbac(&self, overlay: &str) {
        static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let mut done = DONE.lock().unwrap();
        if done.iter().any(|o| o == overlay) {
            return;
        }
        let text = kustomize(overlay);
        let wanted = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ];
        let docs: Vec<&str> = text
            .split("\n---\n")
            .filter(|doc| {
                doc.lines()
                    .find_map(|l| l.strip_prefix("kind: "))
                    .is_some_and(|k| wanted.contains(&k.trim()))
            })
            .collect();
        assert!(!docs.is_empty(), "no RBAC in {overlay}");
        self.apply(&docs.join("\n---\n"));
        done.push(overlay.to_string());
    }

    /// A kubeconfig that authenticates as `namespace/sa` with a token from
    /// `kubectl create token`.
    pub fn token_kubeconfig(&self, namespace: &str, sa: &str) -> PathBuf {
        let token = self.ok(&["-n", namespace, "create", "token", sa, "--duration=1h"]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "envtest", "cluster": {"server": self.url, "certificate-authority-data": b64}}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "sa", "context": {"cluster": "envtest", "user": sa}}],
        });
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{sa}-{}.kubeconfig", free_port()));
        std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig).unwrap()).unwrap();
        path
    }

    /// A namespace with these labels.
    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.apply(
            &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels}})
            .to_string(),
        );
    }

    /// A `kubernetes.io/dockerconfigjson` Secret with generated credentials for `registry`.
    pub fn docker_secret(&self, namespace: &str, name: &str, registry: &str) -> String {
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("robot:{}", super::random_secret()));
        let config = json!({"auths": {registry: {"auth": auth}}}).to_string();
        self.apply(
            &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                "metadata": {"name": name, "namespace": namespace},
                "stringData": {".dockerconfigjson": config}})
            .to_string(),
        );
        config
    }

    /// Registers `hook` as a MutatingWebhookConfiguration named `name`, as `deploy/` has it
    /// but with a `url` clientConfig and limited to `namespaces`.
    pub fn register(&self, name: &str, hook: &Hook, namespaces: &[&str]) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text =
            std::fs::read_to_string(root.join("deploy/base/mutatingwebhookconfiguration.yaml"))
                .unwrap();
        let mut mwc: Value = serde_saphyr::from_str(&text).unwrap();
        mwc["metadata"]["name"] = json!(name);
        let ca = base64::engine::general_purpose::STANDARD.encode(&hook.ca_pem);
        for w in mwc["webhooks"].as_array_mut().unwrap() {
            let path = w["clientConfig"]["service"]["path"]
                .as_str()
                .unwrap()
                .to_string();
            w["clientConfig"] = json!({"url": format!("https://127.0.0.1:{}{path}", hook.addr.port()), "caBundle": ca});
            w["namespaceSelector"]["matchExpressions"]
                .as_array_mut()
                .unwrap()
                .push(json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}));
            // A test must see the webhook fail, not have the API server ignore it.
            w["failurePolicy"] = json!("Fail");
        }
        self.apply(&mwc.to_string());
        super::quiet_period_blocking(
            Duration::from_millis(1500),
            "the API server loads a new webhook configuration (nothing says when it has)",
        );
    }
}

/// `kubectl kustomize` of `overlay` (a directory of this repository): the rendered YAML.
pub fn kustomize(overlay: &str) -> String {
    super::kustomize_text(&Path::new(env!("CARGO_MANIFEST_DIR")).join(overlay))
}

/// The webhook binary, serving on loopback with the Kubernetes access of `kubeconfig`.
pub struct Hook {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub ca_pem: String,
    pub log: Arc<Mutex<String>>,
    /// Where its certificate and key are, and its table.
    pub tls_dir: PathBuf,
    pub config_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Hook {
    /// Starts `serve` with `table`, as `kubeconfig`; returns once `/readyz` says ready.
    pub async fn start(table: &str, kubeconfig: &Path) -> Hook {
        Hook::start_with_env(table, kubeconfig, &[]).await
    }

    /// [`Hook::start`] with more environment variables (`POD_NAME`, as a Pod has it).
    pub async fn start_with_env(table: &str, kubeconfig: &Path, env: &[(&str, &str)]) -> Hook {
        let dir = tempfile::tempdir().unwrap();
        // Certificates and table in directories of their own, as the Deployment mounts them.
        let tls_dir = dir.path().join("tls");
        let config_dir = dir.path().join("config");
        std::fs::create_dir_all(&tls_dir).unwrap();
        std::fs::create_dir_all(&config_dir).unwrap();
        let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
        certs.write(&tls_dir).unwrap();
        let config_path = config_dir.join("table.yaml");
        std::fs::write(&config_path, table).unwrap();
        let mut cmd = super::serve_command(
            &tls_dir.join("tls.crt"),
            &tls_dir.join("tls.key"),
            &config_path,
        );
        cmd.args(["--shutdown-delay", "0s"])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,image_mirror_webhook=debug")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd);
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(addrs) = super::serving_addrs(&line) {
                    let _ = tx.send(addrs);
                }
            }
        });
        let (addr, metrics_addr) =
            tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("serve did not start: {}", log.lock().unwrap()));
        let hook = Hook {
            addr,
            metrics_addr,
            ca_pem: certs.ca_pem.clone(),
            log,
            tls_dir,
            config_path,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("http://{metrics_addr}/readyz"))
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "serve never became ready:\n{}",
                hook.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        hook
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A client that trusts this webhook's certificate, for `https://localhost:PORT`.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .resolve("localhost", self.addr)
            .build()
            .unwrap()
    }

    /// A review of a Pod named `p-<uid>` running `image` in `ns`, straight to `/mutate` over
    /// `client` (from [`Hook::client`]); the response AdmissionReview.
    pub async fn review_with(
        &self,
        client: &reqwest::Client,
        ns: &str,
        uid: &str,
        image: &str,
    ) -> Value {
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": ns, "operation": "CREATE", "userInfo": {"username": "test"},
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p-{uid}"), "namespace": ns},
                    "spec": {"containers": [{"name": "c", "image": image}]}}}});
        client
            .post(format!("https://localhost:{}/mutate", self.addr.port()))
            .json(&review)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// [`Hook::review_with`] on a client of its own.
    pub async fn review(&self, ns: &str, image: &str) -> Value {
        self.review_with(&self.client(), ns, "direct", image).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hook {
    /// Waits up to `secs` for `f` to give something; on a timeout, fails with the webhook's log.
    pub async fn eventually<T>(
        &self,
        secs: u64,
        what: &str,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; the webhook said:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
