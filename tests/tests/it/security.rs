//! The secured control plane: bearer tokens with a read and an admin level
//! on gRPC and HTTP, `Host`/`Origin` checks on HTTP mutations, the refusal
//! to serve a non-loopback address without authentication, and the audit
//! log of mutations.
//!
//! The matrix covers the transports this daemon has: loopback TCP and Unix
//! sockets, each without and with tokens, and a non-loopback bind
//! (`0.0.0.0:0`, reached on 127.0.0.1) with tokens; the non-loopback bind
//! without authentication is refused at start. TLS and client
//! certificates are not implemented yet, so they have no rows or columns.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use asyncore_proto::v1::{self, listeners_client::ListenersClient};
use asyncore_tests::{Daemon, Options, TempDir, binary, eventually, output_within, patience, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, Request, metadata::MetadataValue, transport::Endpoint};

use crate::{http_api::http_address_of, runtime};

const ADMIN_SECRET: &str = "admin-secret-0123456789";
const READ_SECRET: &str = "read-secret-0123456789";

/// The credentials a client presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    None,
    Wrong,
    Read,
    Admin,
}

impl Credential {
    fn secret(self) -> Option<&'static str> {
        match self {
            Credential::None => None,
            Credential::Wrong => Some("not-a-token-of-this-daemon"),
            Credential::Read => Some(READ_SECRET),
            Credential::Admin => Some(ADMIN_SECRET),
        }
    }
}

/// One call of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    GrpcRead,
    GrpcMutation,
    HttpGet,
    HttpPost,
    HttpPostForeignOrigin,
}

/// What a call gets: a gRPC code or an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Grpc(Code),
    Http(u16),
}

use Call::*;
use Credential as C;
use Outcome::{Grpc, Http};

/// Expected outcomes: one row per credential, one column per call of
/// [`CALLS`].
type Table = [(Credential, [Outcome; 5])];

const CALLS: [Call; 5] = [GrpcRead, GrpcMutation, HttpGet, HttpPost, HttpPostForeignOrigin];

/// With tokens configured (loopback or not): credentials x
/// {gRPC read, gRPC mutation, HTTP GET, HTTP POST, HTTP POST with a foreign Origin}.
const WITH_TOKENS: [(Credential, [Outcome; 5]); 4] = [
    (C::None, [Grpc(Code::Unauthenticated), Grpc(Code::Unauthenticated), Http(401), Http(401), Http(403)]),
    (C::Wrong, [Grpc(Code::Unauthenticated), Grpc(Code::Unauthenticated), Http(401), Http(401), Http(403)]),
    (C::Read, [Grpc(Code::Ok), Grpc(Code::PermissionDenied), Http(200), Http(403), Http(403)]),
    (C::Admin, [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)]),
];

/// Without tokens, on loopback: anyone may do anything, but a browser's
/// cross-site request is still refused. A header sent anyway is ignored.
const WITHOUT_TOKENS: [(Credential, [Outcome; 5]); 4] = [
    (C::None, [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)]),
    (C::Wrong, [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)]),
    (C::Read, [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)]),
    (C::Admin, [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)]),
];

fn token_file(dir: &TempDir) -> String {
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("# name level secret\nops admin {ADMIN_SECRET}\nviewer read {READ_SECRET}\n"))
        .unwrap();
    path.display().to_string()
}

/// Where a daemon's APIs are reached.
#[derive(Debug, Clone)]
enum Target {
    Tcp { control: SocketAddr, http: SocketAddr },
    Unix { control: PathBuf, http: PathBuf },
}

impl Target {
    /// The control API's URI for tonic.
    fn grpc_uri(&self) -> String {
        match self {
            Target::Tcp { control, .. } => format!("http://{control}"),
            Target::Unix { control, .. } => format!("unix:{}", control.display()),
        }
    }
}

async fn grpc_call(target: &Target, credential: Credential, call: Call) -> Outcome {
    let channel = Endpoint::from_shared(target.grpc_uri())
        .unwrap()
        .timeout(patience())
        .connect()
        .await
        .expect("connect to the control api");
    let secret = credential.secret();
    let mut client = ListenersClient::with_interceptor(channel, move |mut request: Request<()>| {
        if let Some(secret) = secret {
            let value: MetadataValue<_> = format!("Bearer {secret}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    });
    let result = match call {
        GrpcRead => client.list_listeners(v1::ListListenersRequest::default()).await.map(drop),
        GrpcMutation => {
            client.set_daemon_limits(v1::SetDaemonLimitsRequest { max_connections: Some(0) }).await.map(drop)
        }
        _ => unreachable!("not a gRPC call"),
    };
    Grpc(result.map_or_else(|status| status.code(), |()| Code::Ok))
}

async fn http_call(target: &Target, credential: Credential, call: Call) -> Outcome {
    match target {
        Target::Tcp { http, .. } => tcp_http_call(*http, credential, call).await,
        Target::Unix { http, .. } => unix_http_call(http, credential, call).await,
    }
}

/// The same request as [`tcp_http_call`], by hand over a Unix socket.
async fn unix_http_call(socket: &Path, credential: Credential, call: Call) -> Outcome {
    let (method, path, body) = match call {
        HttpGet => ("GET", "/v1/listeners", ""),
        HttpPost | HttpPostForeignOrigin => ("POST", "/v1/listeners:setLimits", r#"{"maxConnections": "0"}"#),
        _ => unreachable!("not an HTTP call"),
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n",
        body.len()
    );
    if call == HttpPostForeignOrigin {
        request.push_str("origin: http://evil.example\r\n");
    }
    if let Some(secret) = credential.secret() {
        request.push_str(&format!("authorization: Bearer {secret}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let answer = within("an HTTP answer over the unix socket", async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.expect("connect to the http socket");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).unwrap()
    })
    .await;
    let status: u16 = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    if status >= 400 {
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        assert!(body.contains("\"message\""), "{call:?}: {answer}");
    }
    Http(status)
}

async fn tcp_http_call(http: SocketAddr, credential: Credential, call: Call) -> Outcome {
    let client = reqwest::Client::builder().timeout(patience()).build().unwrap();
    let url = |path: &str| format!("http://{http}{path}");
    let mut request = match call {
        HttpGet => client.get(url("/v1/listeners")),
        HttpPost | HttpPostForeignOrigin => client
            .post(url("/v1/listeners:setLimits"))
            .header("content-type", "application/json")
            .body(r#"{"maxConnections": "0"}"#),
        _ => unreachable!("not an HTTP call"),
    };
    if call == HttpPostForeignOrigin {
        request = request.header("origin", "http://evil.example");
    }
    if let Some(secret) = credential.secret() {
        request = request.header("authorization", format!("Bearer {secret}"));
    }
    let response = request.send().await.expect("an HTTP answer");
    let status = response.status().as_u16();
    if status >= 400 {
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).expect("a JSON error body");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{call:?}: {body}");
    }
    Http(status)
}

/// Runs every cell of `table` against a daemon and returns the cells that
/// differ, as lines.
async fn run_matrix(row: &str, target: &Target, table: &Table) -> Vec<String> {
    let mut wrong = Vec::new();
    for (credential, expected) in table {
        for (call, expected) in CALLS.iter().zip(expected) {
            let got = match call {
                GrpcRead | GrpcMutation => grpc_call(target, *credential, *call).await,
                _ => http_call(target, *credential, *call).await,
            };
            if got != *expected {
                wrong.push(format!("{row} x {credential:?} x {call:?}: expected {expected:?}, got {got:?}"));
            }
        }
    }
    wrong
}

/// The address to reach a server bound to `bound` (a wildcard is reached
/// on 127.0.0.1).
fn reach(bound: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], bound.port())) } else { bound }
}

#[test]
fn security_matrix() {
    let tokens = TempDir::new("security-tokens");
    let token_file = token_file(&tokens);
    let rows: [(&str, Options, &Table); 3] = [
        ("loopback TCP without tokens", Options::default(), &WITHOUT_TOKENS),
        (
            "loopback TCP with tokens",
            Options { config: format!("token_file = {token_file:?}\n"), ..Options::default() },
            &WITH_TOKENS,
        ),
        (
            "non-loopback TCP with tokens",
            Options {
                config: format!("token_file = {token_file:?}\n"),
                control: Some("0.0.0.0:0".into()),
                http: Some("0.0.0.0:0".into()),
                ..Options::default()
            },
            &WITH_TOKENS,
        ),
    ];
    let mut wrong = Vec::new();
    for (row, options, table) in rows {
        let daemon = Daemon::start_with(options);
        runtime().block_on(async {
            let target = Target::Tcp { control: reach(daemon.control()), http: reach(http_address_of(&daemon).await) };
            wrong.extend(run_matrix(row, &target, table).await);
        });
    }
    // Unix sockets, with and without tokens.
    for (row, tokens, table) in
        [("unix socket without tokens", false, &WITHOUT_TOKENS), ("unix socket with tokens", true, &WITH_TOKENS)]
    {
        let sockets = TempDir::new("security-unix");
        let run = sockets.path().join("run");
        let (control, http) = (run.join("control.sock"), run.join("http.sock"));
        let mut config = format!("control_socket = {control:?}\nhttp_socket = {http:?}\n");
        if tokens {
            config.push_str(&format!("token_file = {token_file:?}\n"));
        }
        let daemon = Daemon::start_with(Options { config, ..Options::default() });
        assert_eq!(daemon.control_endpoint(), format!("unix:{}", control.display()));
        let target = Target::Unix { control, http };
        runtime().block_on(async { wrong.extend(run_matrix(row, &target, table).await) });
    }
    assert!(wrong.is_empty(), "cells that differ from the table:\n{}", wrong.join("\n"));
}

#[test]
fn a_non_loopback_address_without_authentication_is_refused_at_start() {
    let dir = TempDir::new("security-refused");
    let config = dir.path().join("asyncored.toml");
    std::fs::write(&config, "plugin_dirs = []\nlistener = []\n").unwrap();
    for flags in
        [["--control", "0.0.0.0:0", "--http", "127.0.0.1:0"], ["--control", "127.0.0.1:0", "--http", "0.0.0.0:0"]]
    {
        let output = output_within(Command::new(binary("asyncored")).arg("--config").arg(&config).args(flags));
        assert!(!output.status.success(), "{flags:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("asyncored:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains("0.0.0.0:0") && lines[0].contains("not a loopback address"), "{stderr}");
        assert!(lines[0].contains("--token-file"), "{stderr}");
    }
}

#[test]
fn a_bad_token_file_is_refused_at_start_naming_the_line() {
    let dir = TempDir::new("security-bad-tokens");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ops root 0123456789abcdefgh\n").unwrap();
    let config = dir.path().join("asyncored.toml");
    std::fs::write(&config, "control = \"127.0.0.1:0\"\nhttp = \"none\"\nplugin_dirs = []\n").unwrap();
    let output =
        output_within(Command::new(binary("asyncored")).arg("--config").arg(&config).arg("--token-file").arg(&tokens));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1") && stderr.contains("expected read or admin"), "{stderr}");
    assert!(!stderr.contains("0123456789abcdefgh"), "the secret is never printed: {stderr}");
}

#[test]
fn mutations_are_audited_and_health_needs_no_token() {
    let tokens = TempDir::new("security-audit");
    let token_file = token_file(&tokens);
    let daemon = Daemon::start_with(Options { config: format!("token_file = {token_file:?}\n"), ..Options::default() });
    runtime().block_on(async {
        let http = http_address_of(&daemon).await;
        let target = Target::Tcp { control: daemon.control(), http };
        assert_eq!(grpc_call(&target, C::Admin, GrpcMutation).await, Grpc(Code::Ok));
        assert_eq!(grpc_call(&target, C::Read, GrpcMutation).await, Grpc(Code::PermissionDenied));
        assert_eq!(http_call(&target, C::Admin, HttpPost).await, Http(200));
        assert_eq!(http_call(&target, C::None, HttpPost).await, Http(401));

        // Health checks answer without a token, gRPC and HTTP.
        let channel = Endpoint::from_shared(format!("http://{}", daemon.control())).unwrap().connect().await.unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect("health needs no token");
        assert_eq!(health.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        for path in ["/healthz", "/readyz"] {
            let status = reqwest::get(format!("http://{http}{path}")).await.unwrap().status();
            assert_eq!(status, 200, "{path}");
        }
        let metrics = reqwest::get(format!("http://{http}/metrics")).await.unwrap().status();
        assert_eq!(metrics, 401, "/metrics is not public unless configured so");

        // Size limits: a 100 KiB HTTP body, a 5 MiB gRPC message.
        let big = reqwest::Client::new()
            .post(format!("http://{http}/v1/listeners"))
            .header("authorization", format!("Bearer {ADMIN_SECRET}"))
            .body(format!(r#"{{"address": "{}"}}"#, "x".repeat(100 * 1024)))
            .send()
            .await
            .unwrap();
        assert_eq!(big.status(), 400);
        let body = String::from_utf8_lossy(&big.bytes().await.unwrap()).into_owned();
        assert!(body.contains("length limit exceeded"), "{body}");
        let channel = Endpoint::from_shared(format!("http://{}", daemon.control())).unwrap().connect().await.unwrap();
        let mut client = ListenersClient::with_interceptor(channel, |mut request: Request<()>| {
            request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_SECRET}").parse().unwrap());
            Ok(request)
        });
        let huge = v1::StartListenerRequest { address: "x".repeat(5 << 20), ..Default::default() };
        let refused = client.start_listener(huge).await.expect_err("a 5 MiB request");
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");

        // Quotes aside: the text format quotes string fields.
        let wanted = [
            ("who=ops", "call=asyncore.v1.Listeners/SetDaemonLimits", "result=ok"),
            ("who=viewer", "call=asyncore.v1.Listeners/SetDaemonLimits", "result=PERMISSION_DENIED"),
            ("who=ops", "call=POST /v1/listeners:setLimits", "result=ok"),
            ("who=anonymous", "call=POST /v1/listeners:setLimits", "result=401"),
        ];
        eventually!(
            async || {
                let log = daemon.log();
                wanted.iter().all(|(who, call, result)| {
                    log.lines()
                        .map(|l| l.replace('"', ""))
                        .any(|l| l.contains(" audit:") && l.contains(who) && l.contains(call) && l.contains(result))
                })
            },
            "the audit lines {wanted:?} in the log:\n{}",
            daemon.log()
        )
        .await;
    });
    let log = daemon.log();
    assert!(!log.contains(ADMIN_SECRET) && !log.contains(READ_SECRET), "secrets are never logged");
}

#[test]
fn asyncorectl_sends_the_token_from_a_file_or_the_environment() {
    let tokens = TempDir::new("security-ctl");
    let token_file = token_file(&tokens);
    let secret_only = tokens.path().join("secret");
    std::fs::write(&secret_only, format!("{READ_SECRET}\n")).unwrap();
    let daemon = Daemon::start_with(Options { config: format!("token_file = {token_file:?}\n"), ..Options::default() });
    let ctl = |extra: &[&str], env: Option<&str>| {
        let mut command = Command::new(binary("asyncorectl"));
        command.arg("--control").arg(daemon.control().to_string()).args(extra).env_remove("ASYNCORED_TOKEN");
        if let Some(secret) = env {
            command.env("ASYNCORED_TOKEN", secret);
        }
        output_within(&mut command)
    };
    let stderr = |output: &std::process::Output| String::from_utf8_lossy(&output.stderr).into_owned();

    let anonymous = ctl(&["listeners", "ls"], None);
    assert_eq!(anonymous.status.code(), Some(1), "{}", stderr(&anonymous));
    assert!(stderr(&anonymous).starts_with("asyncorectl: unauthenticated: "), "{}", stderr(&anonymous));

    // The daemon's own token file: its first token (admin) is used.
    let admin = ctl(&["--token-file", &token_file, "listeners", "ls"], None);
    assert!(admin.status.success(), "{}", stderr(&admin));
    // A file holding the secret alone (a read token): reads pass, changes do not.
    let secret_only = secret_only.display().to_string();
    let read = ctl(&["--token-file", &secret_only, "info"], None);
    assert!(read.status.success(), "{}", stderr(&read));
    let refused = ctl(&["--token-file", &secret_only, "config", "reload"], None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).starts_with("asyncorectl: permission denied: "), "{}", stderr(&refused));
    // The environment.
    let from_env = ctl(&["listeners", "ls"], Some(ADMIN_SECRET));
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    // A token file that cannot be read: one line, usage error.
    let missing = ctl(&["--token-file", "/nonexistent/token", "info"], None);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(stderr(&missing).lines().count(), 1, "{}", stderr(&missing));
    assert!(stderr(&missing).contains("cannot read the token file /nonexistent/token"), "{}", stderr(&missing));
}

#[test]
fn unix_sockets_are_private_and_asyncorectl_reaches_them() {
    let sockets = TempDir::new("security-unix-mode");
    let run = sockets.path().join("a").join("run");
    let control = run.join("control.sock");
    let http = run.join("http.sock");
    let daemon = Daemon::start_with(Options {
        config: format!("control_socket = {control:?}\nhttp_socket = {http:?}\n"),
        ..Options::default()
    });
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&control), 0o600);
    assert_eq!(mode(&http), 0o600);
    assert_eq!(mode(&run), 0o700, "the missing directory is made private");
    let listed = daemon.ctl(&["listeners", "ls"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    drop(daemon);

    // A directory open to others is refused, saying why.
    let open = sockets.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = sockets.path().join("asyncored.toml");
    std::fs::write(&config, "plugin_dirs = []\nhttp = \"none\"\n").unwrap();
    let output = output_within(
        Command::new(binary("asyncored"))
            .arg("--config")
            .arg(&config)
            .arg("--control")
            .arg(format!("unix:{}", open.join("control.sock").display())),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has mode 755, open to group or others"), "{stderr}");
    assert!(!open.join("control.sock").exists());
}
