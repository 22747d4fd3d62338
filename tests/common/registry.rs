//! Test harness for registry work: Debian's `docker-registry` (the CNCF distribution registry)
//! on free loopback ports, optionally with TLS (a CA made for the test) and htpasswd auth;
//! generated multi-platform images pushed over the plain distribution API; `skopeo` as the
//! independent reader; and a fault-injecting TCP proxy.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image_mirror_webhook::certs::DevCerts;
use rand::RngCore;
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Blocks until a server started a moment ago takes connections on loopback `port` (the event:
/// its listener is up), failing after `secs` with `what` did not start.
pub fn wait_for_port(port: u16, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn random_secret() -> String {
    let mut b = [0u8; 18];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// TLS material for a registry, and where clients find the CA.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
        std::fs::create_dir_all(dir.join("ca")).unwrap();
        certs.write(dir).unwrap();
        // skopeo's --cert-dir reads every *.crt there as a CA.
        std::fs::write(dir.join("ca/ca.crt"), &certs.ca_pem).unwrap();
        TestCa {
            dir: dir.to_path_buf(),
        }
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
}

/// A running `docker-registry`, killed on drop.
pub struct Registry {
    pub port: u16,
    pub tls: bool,
    pub auth: Option<(String, String)>,
    pub ca: Option<PathBuf>,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn plain() -> Registry {
        Registry::start(None, false)
    }

    /// TLS with a test CA and htpasswd auth with a user and password made now.
    pub fn secured() -> Registry {
        Registry::start(Some(()), true)
    }

    /// Plain HTTP with htpasswd auth (a fault proxy in front of it can then answer 401 or 429).
    pub fn plain_with_auth() -> Registry {
        Registry::start(None, true)
    }

    fn start(tls: Option<()>, auth: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: {}\n",
            dir.path().join("data").display(),
            random_secret()
        );
        let mut ca = None;
        if tls.is_some() {
            let t = TestCa::new(&dir.path().join("tls"));
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.dir.join("tls.crt").display(),
                t.dir.join("tls.key").display()
            ));
            ca = Some(t.dir.clone());
        }
        let mut creds = None;
        if auth {
            // Made now, so that a test can look for it where it must never appear.
            let user = format!("robot-{}", random_secret().to_lowercase().replace('_', "-"));
            let pass = random_secret();
            let out = Command::new("htpasswd")
                .args(["-Bbn", &user, &pass])
                .output()
                .expect("htpasswd (apache2-utils) is installed");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                file.display()
            ));
            creds = Some((user, pass));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut r = Registry {
            port,
            tls: tls.is_some(),
            auth: creds,
            ca,
            config: config_path,
            child: None,
            _dir: dir,
        };
        r.resume();
        r
    }

    /// Starts the registry process (again, on the same port and storage).
    pub fn resume(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed");
        self.child = Some(child);
        wait_for_port(self.port, 15, "docker-registry");
    }

    /// Takes `user` and `password` from now on (and no other), restarting the registry so
    /// that it reads them; what it stores stays.
    pub fn set_credentials(&mut self, user: &str, password: &str) {
        assert!(self.auth.is_some(), "a registry started with auth");
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd (apache2-utils) is installed");
        assert!(out.status.success());
        std::fs::write(self._dir.path().join("htpasswd"), &out.stdout).unwrap();
        self.auth = Some((user.to_string(), password.to_string()));
        self.stop();
        self.resume();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|d| d.join("ca.crt"))
    }

    /// A `.dockerconfigjson` for this registry, written to `path`.
    pub fn write_docker_config(&self, path: &Path) {
        let (u, p) = self.auth.as_ref().expect("registry has auth");
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        let text = json!({"auths": {self.host(): {"auth": auth}}});
        std::fs::write(path, serde_json::to_vec(&text).unwrap()).unwrap();
    }

    /// The `registries:` entry of a table for this registry.
    pub fn table_access(&self, docker_config: &Path) -> String {
        let mut parts = Vec::new();
        if !self.tls {
            parts.push("insecure: true".to_string());
        }
        if let Some(ca) = self.ca_file() {
            parts.push(format!("caFile: {}", ca.display()));
        }
        if self.auth.is_some() {
            self.write_docker_config(docker_config);
            parts.push(format!("dockerConfig: {}", docker_config.display()));
        }
        format!("  \"{}\": {{{}}}\n", self.host(), parts.join(", "))
    }

    pub fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = self.ca_file() {
            let pem = std::fs::read(ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    fn authed(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// Pushes blobs, manifests by digest and the index by `tag`, over the plain API.
    pub async fn push(&self, repo: &str, tag: &str, image: &TestImage) {
        let c = self.client();
        for (digest, data) in &image.blobs {
            let res = self
                .authed(c.post(format!("{}/v2/{repo}/blobs/uploads/", self.base_url())))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202, "start upload");
            let location = res.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with("http") {
                location
            } else {
                format!("{}{location}", self.base_url())
            };
            let sep = if location.contains('?') { '&' } else { '?' };
            let res = self
                .authed(c.put(format!("{location}{sep}digest={digest}")))
                .header("content-type", "application/octet-stream")
                .body(data.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201, "finish upload of {digest}");
        }
        for (digest, body, media_type) in &image.manifests {
            self.put_manifest(&c, repo, digest, body, media_type).await;
        }
        let (_, body, media_type) = &image.top;
        self.put_manifest(&c, repo, tag, body, media_type).await;
    }

    /// Puts one manifest under `reference` (a tag or a digest).
    pub async fn put_manifest(
        &self,
        c: &reqwest::Client,
        repo: &str,
        reference: &str,
        body: &[u8],
        media_type: &str,
    ) {
        let res = self
            .authed(c.put(format!(
                "{}/v2/{repo}/manifests/{reference}",
                self.base_url()
            )))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "push manifest {repo}:{reference}");
    }

    /// Whether the registry holds the blob (HEAD).
    pub async fn has_blob(&self, repo: &str, digest: &str) -> bool {
        let res = self
            .authed(
                self.client()
                    .head(format!("{}/v2/{repo}/blobs/{digest}", self.base_url())),
            )
            .send()
            .await
            .unwrap();
        res.status() == 200
    }

    /// `skopeo inspect --raw` of `repo` at a tag or digest: the exact manifest bytes.
    pub fn skopeo_raw(&self, repo: &str, reference: &str) -> Option<Vec<u8>> {
        let sep = if reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw"]);
        if self.tls {
            cmd.arg(format!(
                "--cert-dir={}",
                self.ca.as_ref().unwrap().join("ca").display()
            ));
        } else {
            cmd.arg("--tls-verify=false");
        }
        if let Some((u, p)) = &self.auth {
            cmd.arg(format!("--creds={u}:{p}"));
        }
        cmd.arg(format!("docker://{}/{repo}{sep}{reference}", self.host()));
        let out = cmd.output().expect("skopeo is installed");
        out.status.success().then_some(out.stdout)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A generated image: an OCI index over several platforms, their configs and layers.
pub struct TestImage {
    /// (digest, bytes) of every config and layer, each once.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// (digest, bytes, media type) of the platform manifests.
    pub manifests: Vec<(String, Vec<u8>, String)>,
    /// The index.
    pub top: (String, Vec<u8>, String),
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

impl TestImage {
    /// An index over `platforms` ("linux/amd64", "linux/arm64/v8"): each platform has a config
    /// and a small layer of its own, and all share one layer of `shared_layer` bytes.
    pub fn generate(platforms: &[&str], shared_layer: usize) -> TestImage {
        let mut blobs = Vec::new();
        let shared = random_bytes(shared_layer);
        let shared_digest = sha256(&shared);
        blobs.push((shared_digest.clone(), shared));
        let mut manifests = Vec::new();
        let mut entries = Vec::new();
        for p in platforms {
            let parts: Vec<&str> = p.split('/').collect();
            let mut platform = json!({"os": parts[0], "architecture": parts[1]});
            if let Some(v) = parts.get(2) {
                platform["variant"] = json!(v);
            }
            let config = serde_json::to_vec(&json!({
                "architecture": parts[1], "os": parts[0],
                "config": {"Env": [format!("NONCE={}", random_secret())]},
                "rootfs": {"type": "layers", "diff_ids": []}
            }))
            .unwrap();
            let own = random_bytes(64 * 1024 + manifests.len() * 1000);
            let (cd, od) = (sha256(&config), sha256(&own));
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": shared_digest, "size": shared_layer},
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": od, "size": own.len()}
                ]
            }))
            .unwrap();
            let md = sha256(&manifest);
            entries.push(json!({"mediaType": OCI_MANIFEST, "digest": md, "size": manifest.len(), "platform": platform}));
            blobs.push((cd, config));
            blobs.push((od, own));
            manifests.push((md, manifest, OCI_MANIFEST.to_string()));
        }
        // Pretty-printed on purpose: a copy that re-serialises would change the digest.
        let index = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
            "annotations": {"org.opencontainers.image.title": "generated"}
        }))
        .unwrap();
        TestImage {
            blobs,
            manifests,
            top: (sha256(&index), index, OCI_INDEX.to_string()),
        }
    }

    /// An artifact pointing at `subject` (digest, size, media type), as a signer pushes one:
    /// an OCI manifest with one payload layer, an `artifactType` and, for OCI 1.1 referrers,
    /// a `subject`. cosign's own signatures carry no `subject`; they live under tags.
    pub fn artifact(
        subject: (&str, usize, &str),
        artifact_type: &str,
        with_subject: bool,
    ) -> TestImage {
        let config = b"{}".to_vec();
        let payload = serde_json::to_vec(&json!({
            "critical": {"image": {"docker-manifest-digest": subject.0}},
            "optional": {"nonce": random_secret()}
        }))
        .unwrap();
        let (cd, pd) = (sha256(&config), sha256(&payload));
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": config.len()},
            "layers": [{
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "digest": pd, "size": payload.len(),
                "annotations": {"dev.cosignproject.cosign/signature": random_secret()}
            }]
        });
        if with_subject {
            manifest["subject"] =
                json!({"mediaType": subject.2, "digest": subject.0, "size": subject.1});
        }
        let body = serde_json::to_vec_pretty(&manifest).unwrap();
        TestImage {
            blobs: vec![(cd, config), (pd, payload)],
            manifests: Vec::new(),
            top: (sha256(&body), body, OCI_MANIFEST.to_string()),
        }
    }

    /// The referrers tag schema's index (`sha256-<hex>`) listing `artifacts`.
    pub fn referrers_index(artifacts: &[(&TestImage, &str)]) -> Vec<u8> {
        let entries: Vec<Value> = artifacts
            .iter()
            .map(|(a, artifact_type)| {
                json!({"mediaType": OCI_MANIFEST, "digest": a.top.0, "size": a.top.1.len(),
                       "artifactType": artifact_type})
            })
            .collect();
        serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries
        }))
        .unwrap()
    }

    pub fn total_bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// What the proxy does with new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Accept, read, never answer.
    Hang,
    /// Answer every request with this status (and `Retry-After: 1` on 429).
    Status(u16),
}

struct ProxyState {
    fault: Fault,
    /// Requests to answer with `fault` before passing again (None: until changed).
    remaining: Option<u32>,
    refused: u32,
    connections: Vec<tokio::task::AbortHandle>,
}

/// A TCP proxy in front of a plain-HTTP registry that can hang or refuse on demand.
#[derive(Clone)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            fault: Fault::Pass,
            remaining: None,
            refused: 0,
            connections: Vec::new(),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let st2 = st.clone();
                let task = tokio::spawn(async move {
                    loop {
                        let fault = {
                            let mut s = st2.lock().unwrap();
                            match s.remaining {
                                Some(0) => {
                                    s.fault = Fault::Pass;
                                    s.remaining = None;
                                }
                                Some(n) if s.fault != Fault::Pass => s.remaining = Some(n - 1),
                                _ => {}
                            }
                            s.fault
                        };
                        match fault {
                            Fault::Pass => {
                                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                                }
                                return;
                            }
                            Fault::Hang => {
                                let mut sink = [0u8; 4096];
                                while conn.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
                                return;
                            }
                            Fault::Status(code) => {
                                if !read_request_head(&mut conn).await {
                                    return;
                                }
                                st2.lock().unwrap().refused += 1;
                                let (reason, body, extra) = match code {
                                    429 => (
                                        "Too Many Requests",
                                        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
                                        "Retry-After: 1\r\n",
                                    ),
                                    401 => (
                                        "Unauthorized",
                                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}"#,
                                        "",
                                    ),
                                    _ => ("Error", "oops", ""),
                                };
                                let head = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n", body.len());
                                let _ = conn.write_all(head.as_bytes()).await;
                                let _ = conn.write_all(body.as_bytes()).await;
                                // Keep the connection: the next request on it is judged afresh.
                            }
                        }
                    }
                });
                st.lock().unwrap().connections.push(task.abort_handle());
            }
        });
        FaultProxy { addr, state }
    }

    /// Sets the fault for every request from now on; open connections are cut.
    pub fn set(&self, fault: Fault) {
        let mut s = self.state.lock().unwrap();
        s.fault = fault;
        s.remaining = None;
        for c in s.connections.drain(..) {
            c.abort();
        }
    }

    /// Answers the next `n` requests with `fault`, then passes again.
    pub fn fail_next(&self, n: u32, fault: Fault) {
        self.set(fault);
        self.state.lock().unwrap().remaining = Some(n);
    }

    pub fn refused(&self) -> u32 {
        self.state.lock().unwrap().refused
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Reads one request head and its body (Content-Length only; registry reads send none).
async fn read_request_head(conn: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.is_ok()
}
