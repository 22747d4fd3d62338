//! AWS on loopback: moto (PyPI `moto[server]`, pip-installed into the tests' venv) for STS and
//! ECR, and [`Answers`], a server that gives the documented answers moto cannot (a refused
//! role, pull-through cache rules). Nothing here reaches AWS: every endpoint is 127.0.0.1, and
//! instance metadata is off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_port, random_secret};

pub const MOTO: &str = "moto[server]==5.2.5";

/// The account of the role the tests' IRSA environment assumes: moto issues this account's
/// ECR token, `<account>-auth-token`.
pub const ACCOUNT: &str = "111111111111";
pub const REGION: &str = "us-east-1";

/// The password moto's `GetAuthorizationToken` gives an identity of [`ACCOUNT`].
pub fn moto_token() -> String {
    format!("{ACCOUNT}-auth-token")
}

/// A `moto_server` on a free loopback port, killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
    python: PathBuf,
}

impl Moto {
    pub fn start() -> Moto {
        let python = super::python::python(&[MOTO]);
        let port = free_port();
        let child = Command::new(python.with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server in the venv");
        super::wait_for_port(port, 60, "moto_server");
        Moto {
            port,
            child,
            python,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What moto's ECR holds, through boto3 (moto's own client): `describe_repositories`, and
    /// each repository's lifecycle policy text (or null).
    pub fn repositories(&self) -> serde_json::Value {
        let script = r#"
import boto3, json, sys
# moto files what an identity makes under its account: look as a role of that account.
sts = boto3.client("sts", endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id="testing", aws_secret_access_key="testing")
c = sts.assume_role_with_web_identity(RoleArn="arn:aws:iam::%s:role/reader" % sys.argv[3],
                                      RoleSessionName="reader", WebIdentityToken="reader-token")["Credentials"]
ecr = boto3.client("ecr", endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                   aws_session_token=c["SessionToken"])
repos = []
for r in ecr.describe_repositories(registryId=sys.argv[3])["repositories"]:
    try:
        policy = ecr.get_lifecycle_policy(registryId=sys.argv[3], repositoryName=r["repositoryName"])["lifecyclePolicyText"]
    except ecr.exceptions.LifecyclePolicyNotFoundException:
        policy = None
    repos.append({"name": r["repositoryName"], "tagMutability": r["imageTagMutability"],
                  "scanOnPush": r["imageScanningConfiguration"]["scanOnPush"],
                  "encryption": r["encryptionConfiguration"]["encryptionType"],
                  "lifecyclePolicy": policy})
print(json.dumps(repos))
"#;
        let out = Command::new(&self.python)
            .args(["-c", script, &self.url(), REGION, ACCOUNT])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment of a Pod with IRSA, pointed at `sts` and `ecr` (loopback URLs): a web
/// identity token file (made now, in `dir`) and a role ARN; every other source off.
pub fn irsa(dir: &Path, sts: &str, ecr: &str) -> Vec<(String, String)> {
    let token = dir.join("web-identity-token");
    std::fs::write(&token, random_secret()).unwrap();
    let mut env = isolated(dir);
    env.extend([
        (
            "AWS_ROLE_ARN".to_string(),
            format!("arn:aws:iam::{ACCOUNT}:role/image-mirror-webhook"),
        ),
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE".to_string(),
            token.display().to_string(),
        ),
        (
            "AWS_ROLE_SESSION_NAME".to_string(),
            "image-mirror-webhook".to_string(),
        ),
        ("AWS_ENDPOINT_URL_STS".to_string(), sts.to_string()),
        ("AWS_ENDPOINT_URL_ECR".to_string(), ecr.to_string()),
    ]);
    env
}

/// No AWS identity at all: no keys, no IRSA, no Pod Identity, no profile, instance metadata
/// off (the tests reach nothing but loopback).
pub fn isolated(dir: &Path) -> Vec<(String, String)> {
    for empty in ["no-aws-config", "no-aws-credentials"] {
        std::fs::write(dir.join(empty), "").unwrap();
    }
    vec![
        ("AWS_REGION".to_string(), REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
        (
            "AWS_CONFIG_FILE".to_string(),
            dir.join("no-aws-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".to_string(),
            dir.join("no-aws-credentials").display().to_string(),
        ),
    ]
}

/// The AWS variables of this process that would leak into a child: removed from `cmd`.
pub fn clear_aws(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
}

/// A loopback server giving AWS's documented answers that moto does not: STS refusing
/// `AssumeRoleWithWebIdentity` (403 AccessDenied, the Query protocol's XML error), and ECR's
/// `DescribePullThroughCacheRules` (JSON 1.1) with the given rules (prefix, upstream URL).
pub struct Answers {
    pub addr: SocketAddr,
    _task: tokio::task::JoinHandle<()>,
}

impl Answers {
    pub async fn start(rules: &[(&str, &str)]) -> Answers {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let rules: Vec<serde_json::Value> = rules
            .iter()
            .map(|(prefix, upstream)| {
                serde_json::json!({
                    "ecrRepositoryPrefix": prefix,
                    "upstreamRegistryUrl": upstream,
                    "registryId": ACCOUNT,
                    "createdAt": 1.7e9,
                })
            })
            .collect();
        let body = serde_json::json!({ "pullThroughCacheRules": rules }).to_string();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |headers: HeaderMap, form: String| {
                let body = body.clone();
                async move {
                    let target = headers
                        .get("x-amz-target")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if target.ends_with(".DescribePullThroughCacheRules") {
                        return (
                            StatusCode::OK,
                            [("content-type", "application/x-amz-json-1.1")],
                            body,
                        )
                            .into_response();
                    }
                    if form.contains("Action=AssumeRoleWithWebIdentity") {
                        let xml = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                            <Error><Type>Sender</Type><Code>AccessDenied</Code>\
                            <Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message>\
                            </Error><RequestId>5e0c7c3a-0000-4000-8000-000000000000</RequestId></ErrorResponse>";
                        return (StatusCode::FORBIDDEN, [("content-type", "text/xml")], xml)
                            .into_response();
                    }
                    (StatusCode::BAD_REQUEST, format!("not answered here: {target}"))
                        .into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Answers { addr, _task: task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
