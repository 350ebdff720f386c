//! The secured control plane: bearer tokens with a read and an admin level
//! on gRPC and HTTP, `Host`/`Origin` checks on HTTP mutations, the refusal
//! to serve a non-loopback address without authentication, and the audit
//! log of mutations.
//!
//! The matrix covers the transports this daemon has: loopback TCP and Unix
//! sockets, each without and with tokens, a non-loopback bind (`0.0.0.0:0`,
//! reached on 127.0.0.1) with tokens, with TLS alone, and with TLS, a
//! client CA and tokens, and mutual TLS alone on loopback; the
//! non-loopback bind without authentication is refused at start. The
//! credentials are no token, a wrong one, a read token, an admin token,
//! and a client certificate (signed by the `--client-ca`, presented over
//! TLS; on a plain TCP port or a Unix socket, which have no TLS, the
//! handshake itself fails). The CA and the certificates are made at test
//! time with rcgen.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use asyncore_proto::v1::{self, listeners_client::ListenersClient};
use asyncore_tests::{Daemon, Options, TempDir, binary, eventually, output_within, patience, within};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tonic::{
    Code, Request,
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

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
    /// A client certificate signed by the daemon's client CA, over TLS.
    ClientCert,
}

impl Credential {
    fn secret(self) -> Option<&'static str> {
        match self {
            Credential::None | Credential::ClientCert => None,
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
    /// No answer: the connection or its TLS handshake failed.
    NoConnection,
}

use Call::*;
use Credential as C;
use Outcome::{Grpc, Http, NoConnection};

/// Expected outcomes: one row per credential, one column per call of
/// [`CALLS`].
type Table = [(Credential, [Outcome; 5])];

const CALLS: [Call; 5] = [GrpcRead, GrpcMutation, HttpGet, HttpPost, HttpPostForeignOrigin];

/// Everything allowed, but a browser's cross-site request.
const ALLOWED: [Outcome; 5] = [Grpc(Code::Ok), Grpc(Code::Ok), Http(200), Http(200), Http(403)];

/// A client certificate on a port without TLS: the handshake fails.
const NO_TLS_THERE: [Outcome; 5] = [NoConnection; 5];

/// With tokens configured (loopback or not, plain TCP): credentials x
/// {gRPC read, gRPC mutation, HTTP GET, HTTP POST, HTTP POST with a foreign Origin}.
const WITH_TOKENS: [(Credential, [Outcome; 5]); 5] = [
    (C::None, [Grpc(Code::Unauthenticated), Grpc(Code::Unauthenticated), Http(401), Http(401), Http(403)]),
    (C::Wrong, [Grpc(Code::Unauthenticated), Grpc(Code::Unauthenticated), Http(401), Http(401), Http(403)]),
    (C::Read, [Grpc(Code::Ok), Grpc(Code::PermissionDenied), Http(200), Http(403), Http(403)]),
    (C::Admin, ALLOWED),
    (C::ClientCert, NO_TLS_THERE),
];

/// Without tokens, on loopback: anyone may do anything, but a browser's
/// cross-site request is still refused. A header sent anyway is ignored.
const WITHOUT_TOKENS: [(Credential, [Outcome; 5]); 5] =
    [(C::None, ALLOWED), (C::Wrong, ALLOWED), (C::Read, ALLOWED), (C::Admin, ALLOWED), (C::ClientCert, NO_TLS_THERE)];

/// TLS without a client CA or tokens (allowed on any address): TLS keeps
/// the traffic private, and anyone who completes the handshake may do
/// anything; a client certificate is not asked for, so it changes nothing.
const TLS_ONLY: [(Credential, [Outcome; 5]); 5] =
    [(C::None, ALLOWED), (C::Wrong, ALLOWED), (C::Read, ALLOWED), (C::Admin, ALLOWED), (C::ClientCert, ALLOWED)];

/// TLS with a client CA and tokens: the certificate is optional in the
/// handshake; with one a client is admin, without one its token decides.
const TLS_CLIENT_CA_AND_TOKENS: [(Credential, [Outcome; 5]); 5] =
    [WITH_TOKENS[0], WITH_TOKENS[1], WITH_TOKENS[2], WITH_TOKENS[3], (C::ClientCert, ALLOWED)];

/// Mutual TLS alone (no tokens): a client without a certificate fails the
/// handshake, whatever header it would send; one with a certificate is
/// admin.
const MUTUAL_TLS: [(Credential, [Outcome; 5]); 5] = [
    (C::None, [NoConnection; 5]),
    (C::Wrong, [NoConnection; 5]),
    (C::Read, [NoConnection; 5]),
    (C::Admin, [NoConnection; 5]),
    (C::ClientCert, ALLOWED),
];

/// A test PKI, made with rcgen: a CA, a server certificate for
/// `localhost` and 127.0.0.1 signed by it, a client certificate (CN
/// `ops-laptop`) signed by it, and a client certificate of another CA.
#[derive(Debug)]
struct Pki {
    dir: TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca: String,
    client_cert: String,
    client_key: String,
    foreign_cert: String,
    foreign_key: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("security-pki");
        let issuer = Pki::ca("asyncored test CA");
        let (client_cert, client_key) = Pki::client(&issuer, "ops-laptop");
        let (foreign_cert, foreign_key) = Pki::client(&Pki::ca("another CA"), "intruder");
        let ca = issuer.pem();
        let pki = Pki { dir, issuer, ca, client_cert, client_key, foreign_cert, foreign_key };
        for (name, text) in [
            ("ca.pem", pki.ca.clone()),
            ("client.pem", pki.client_cert.clone()),
            ("client.key", pki.client_key.clone()),
        ] {
            std::fs::write(pki.dir.path().join(name), text).unwrap();
        }
        pki.issue_server_cert("asyncored");
        pki
    }

    /// Signs a new server certificate (CN `name`) for `localhost` and
    /// 127.0.0.1 with a new key, writes both to `server.pem` and
    /// `server.key`, and returns the certificate (DER).
    fn issue_server_cert(&self, name: &str) -> Vec<u8> {
        let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server.distinguished_name.push(DnType::CommonName, name);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let server = server.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(self.dir.path().join("server.key"), key.serialize_pem()).unwrap();
        server.der().to_vec()
    }

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn client(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Config lines: TLS, and with `client_ca` mutual TLS.
    fn config(&self, client_ca: bool) -> String {
        let mut config = format!("tls_cert = {:?}\ntls_key = {:?}\n", self.path("server.pem"), self.path("server.key"));
        if client_ca {
            config.push_str(&format!("client_ca = {:?}\n", self.path("ca.pem")));
        }
        config
    }

    /// A rustls client config trusting the CA, presenting `identity` (a
    /// certificate and its key) if given, offering `alpn`.
    fn rustls_client(&self, identity: Option<(&str, &str)>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca.as_bytes()).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }
}

fn token_file(dir: &TempDir) -> String {
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("# name level secret\nops admin {ADMIN_SECRET}\nviewer read {READ_SECRET}\n"))
        .unwrap();
    path.display().to_string()
}

/// Where a daemon's APIs are reached.
#[derive(Debug, Clone)]
enum Target {
    /// `tls`: the daemon serves TLS (with the [`Pki`]'s server certificate).
    Tcp {
        control: SocketAddr,
        http: SocketAddr,
        tls: bool,
    },
    Unix {
        control: PathBuf,
        http: PathBuf,
    },
}

impl Target {
    /// The control API's URI for tonic.
    fn grpc_uri(&self, tls: bool) -> String {
        match self {
            Target::Tcp { control, .. } if tls => format!("https://{control}"),
            Target::Tcp { control, .. } => format!("http://{control}"),
            // TLS over the socket: tonic's TLS needs an https:// URI, and
            // [`UnixConnector`] reaches the socket.
            Target::Unix { .. } if tls => "https://localhost".to_owned(),
            Target::Unix { control, .. } => format!("unix:{}", control.display()),
        }
    }

    /// Whether a client speaks TLS to it with `credential`: always with a
    /// client certificate, else when the daemon serves TLS.
    fn tls(&self, credential: Credential) -> bool {
        credential == C::ClientCert || matches!(self, Target::Tcp { tls: true, .. })
    }
}

/// A gRPC call with tonic, over TLS when [`Target::tls`] (trusting the
/// test CA; with the client certificate for [`Credential::ClientCert`]).
async fn grpc_call(target: &Target, pki: &Pki, credential: Credential, call: Call) -> Outcome {
    let tls = target.tls(credential);
    let mut endpoint = Endpoint::from_shared(target.grpc_uri(tls)).unwrap().timeout(patience());
    if tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca));
        if credential == C::ClientCert {
            config = config.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
        }
        endpoint = endpoint.tls_config(config).unwrap();
    }
    let connected = match target {
        Target::Unix { control, .. } if tls => endpoint.connect_with_connector(UnixConnector(control.clone())).await,
        _ => endpoint.connect().await,
    };
    let channel = match connected {
        Ok(channel) => channel,
        Err(_) if tls => return NoConnection,
        Err(e) => panic!("connect to the control api: {e}"),
    };
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
    match result {
        Ok(()) => Grpc(Code::Ok),
        // Made up on this side: the connection (its TLS handshake) failed.
        Err(status) if tls && std::error::Error::source(&status).is_some() => NoConnection,
        Err(status) => Grpc(status.code()),
    }
}

async fn http_call(target: &Target, pki: &Pki, credential: Credential, call: Call) -> Outcome {
    match target {
        _ if target.tls(credential) => tls_http_call(target, pki, credential, call).await,
        Target::Tcp { http, .. } => tcp_http_call(*http, credential, call).await,
        Target::Unix { http, .. } => unix_http_call(http, credential, call).await,
    }
}

/// The same request as [`unix_http_call`], by hand over TLS (tokio-rustls,
/// ALPN `http/1.1`), trusting the test CA; with the client certificate
/// for [`Credential::ClientCert`]. A failed handshake, or a connection
/// closed without an answer, is [`NoConnection`].
async fn tls_http_call(target: &Target, pki: &Pki, credential: Credential, call: Call) -> Outcome {
    let identity = (credential == C::ClientCert).then_some((pki.client_cert.as_str(), pki.client_key.as_str()));
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client(identity, b"http/1.1"));
    within("an HTTP answer over TLS", async {
        match target {
            Target::Tcp { http, .. } => {
                let request = http_request(&http.to_string(), "https://evil.example", credential, call);
                let tcp = tokio::net::TcpStream::connect(http).await.expect("connect to the http api");
                tls_exchange(&connector, tcp, &request, call).await
            }
            Target::Unix { http, .. } => {
                let request = http_request("localhost", "https://evil.example", credential, call);
                let unix = tokio::net::UnixStream::connect(http).await.expect("connect to the http socket");
                tls_exchange(&connector, unix, &request, call).await
            }
        }
    })
    .await
}

/// The TLS handshake (for `localhost`) on `stream`, then the exchange.
async fn tls_exchange(
    connector: &tokio_rustls::TlsConnector,
    stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &str,
    call: Call,
) -> Outcome {
    let Ok(stream) = connector.connect(ServerName::try_from("localhost").unwrap(), stream).await else {
        return NoConnection;
    };
    match exchange(stream, request).await {
        Some(answer) => http_status_of(call, &answer),
        None => NoConnection,
    }
}

/// Connects tonic to a Unix socket whatever the URI says (so that TLS, which
/// tonic applies to `https://` URIs, can be tried over the socket).
#[derive(Debug, Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<tonic::transport::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::UnixStream>>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) })
    }
}

/// An HTTP/1.1 request of `call`, by hand; `foreign` is the Origin of
/// [`HttpPostForeignOrigin`].
fn http_request(host: &str, foreign: &str, credential: Credential, call: Call) -> String {
    let (method, path, body) = match call {
        HttpGet => ("GET", "/v1/listeners", ""),
        HttpPost | HttpPostForeignOrigin => ("POST", "/v1/listeners:setLimits", r#"{"maxConnections": "0"}"#),
        _ => unreachable!("not an HTTP call"),
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n",
        body.len()
    );
    if call == HttpPostForeignOrigin {
        request.push_str(&format!("origin: {foreign}\r\n"));
    }
    if let Some(secret) = credential.secret() {
        request.push_str(&format!("authorization: Bearer {secret}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

/// Sends `request` and reads the whole answer; `None` if the connection
/// fails or closes without one.
async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> Option<String> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    (!answer.is_empty()).then(|| String::from_utf8(answer).unwrap())
}

/// The status of a raw HTTP answer; an error's body must carry a message.
fn http_status_of(call: Call, answer: &str) -> Outcome {
    let status: u16 = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    if status >= 400 {
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        assert!(body.contains("\"message\""), "{call:?}: {answer}");
    }
    Http(status)
}

/// The same request as [`tcp_http_call`], by hand over a Unix socket.
async fn unix_http_call(socket: &Path, credential: Credential, call: Call) -> Outcome {
    let request = http_request("localhost", "http://evil.example", credential, call);
    let answer = within("an HTTP answer over the unix socket", async {
        let stream = tokio::net::UnixStream::connect(socket).await.expect("connect to the http socket");
        exchange(stream, &request).await.expect("an answer over the unix socket")
    })
    .await;
    http_status_of(call, &answer)
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
async fn run_matrix(row: &str, target: &Target, pki: &Pki, table: &Table) -> Vec<String> {
    let mut wrong = Vec::new();
    for (credential, expected) in table {
        for (call, expected) in CALLS.iter().zip(expected) {
            let got = match call {
                GrpcRead | GrpcMutation => grpc_call(target, pki, *credential, *call).await,
                _ => http_call(target, pki, *credential, *call).await,
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
    let pki = Pki::new();
    let tokens = format!("token_file = {token_file:?}\n");
    let anywhere = |config: String| Options {
        config,
        control: Some("0.0.0.0:0".into()),
        http: Some("0.0.0.0:0".into()),
        ..Options::default()
    };
    // Each row: its daemon, whether it serves TLS, and the expected table.
    let rows: [(&str, Options, bool, &Table); 6] = [
        ("loopback TCP without tokens", Options::default(), false, &WITHOUT_TOKENS),
        ("loopback TCP with tokens", Options { config: tokens.clone(), ..Options::default() }, false, &WITH_TOKENS),
        ("non-loopback TCP with tokens", anywhere(tokens.clone()), false, &WITH_TOKENS),
        ("non-loopback with TLS", anywhere(pki.config(false)), true, &TLS_ONLY),
        (
            "non-loopback with TLS, a client CA and tokens",
            anywhere(pki.config(true) + &tokens),
            true,
            &TLS_CLIENT_CA_AND_TOKENS,
        ),
        ("loopback with mutual TLS", Options { config: pki.config(true), ..Options::default() }, true, &MUTUAL_TLS),
    ];
    let mut wrong = Vec::new();
    for (row, options, tls, table) in rows {
        let daemon = Daemon::start_with(options);
        runtime().block_on(async {
            let (control, http) = (reach(daemon.control()), reach(http_address_of(&daemon).await));
            let target = Target::Tcp { control, http, tls };
            wrong.extend(run_matrix(row, &target, &pki, table).await);
        });
    }
    // Unix sockets, with and without tokens; no TLS there, so a client
    // certificate gets no further than the handshake.
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
        runtime().block_on(async { wrong.extend(run_matrix(row, &target, &pki, table).await) });
    }
    assert!(wrong.is_empty(), "cells that differ from the table:\n{}", wrong.join("\n"));
}

/// The `Host` of a mutation: without tokens only a loopback name or the
/// bound address (a page that made its own name resolve to the daemon is
/// refused); with tokens any, since a client on another machine names the
/// daemon as it reaches it and no page can send a token. A foreign
/// `Origin` is refused either way.
#[test]
fn with_tokens_a_mutation_may_name_any_host_and_without_them_only_this_daemon() {
    let tokens = TempDir::new("security-host");
    let token_file = token_file(&tokens);
    let with_tokens = Options {
        config: format!("token_file = {token_file:?}\n"),
        control: Some("0.0.0.0:0".into()),
        http: Some("0.0.0.0:0".into()),
        ..Options::default()
    };
    for (options, remote, rebound) in [(with_tokens, 200, 200), (Options::default(), 403, 403)] {
        let daemon = Daemon::start_with(options);
        runtime().block_on(async {
            let http = reach(http_address_of(&daemon).await);
            let status = |host: String, call: Call| async move {
                let request = http_request(&host, "http://evil.example", Credential::Admin, call);
                let stream = tokio::net::TcpStream::connect(http).await.expect("connect to the http api");
                let answer = within("an HTTP answer", exchange(stream, &request)).await.expect("an answer");
                http_status_of(call, &answer)
            };
            let port = http.port();
            assert_eq!(status(format!("127.0.0.1:{port}"), HttpPost).await, Http(200));
            assert_eq!(status(format!("192.0.2.2:{port}"), HttpPost).await, Http(remote), "a remote client's Host");
            assert_eq!(status(format!("rebound.example:{port}"), HttpPost).await, Http(rebound), "a rebound name");
            let foreign = status(format!("192.0.2.2:{port}"), HttpPostForeignOrigin).await;
            assert_eq!(foreign, Http(403), "a foreign Origin");
        });
    }
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
    let pki = Pki::new();
    runtime().block_on(async {
        let http = http_address_of(&daemon).await;
        let target = Target::Tcp { control: daemon.control(), http, tls: false };
        assert_eq!(grpc_call(&target, &pki, C::Admin, GrpcMutation).await, Grpc(Code::Ok));
        assert_eq!(grpc_call(&target, &pki, C::Read, GrpcMutation).await, Grpc(Code::PermissionDenied));
        assert_eq!(http_call(&target, &pki, C::Admin, HttpPost).await, Http(200));
        assert_eq!(http_call(&target, &pki, C::None, HttpPost).await, Http(401));

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
        // What was asked is in the line of a call its handler served.
        let asked = "args=SetDaemonLimitsRequest { max_connections: Some(0) }";
        let wanted = [
            ("who=ops", "call=asyncore.v1.Listeners/SetDaemonLimits", asked, "result=ok"),
            ("who=viewer", "call=asyncore.v1.Listeners/SetDaemonLimits", "args= ", "result=PERMISSION_DENIED"),
            ("who=ops", "call=POST /v1/listeners:setLimits", "args=SetDaemonLimitsRequest {", "result=ok"),
            ("who=anonymous", "call=POST /v1/listeners:setLimits", "args= ", "result=401"),
        ];
        eventually!(
            async || {
                let log = daemon.log();
                wanted.iter().all(|(who, call, args, result)| {
                    log.lines().map(|l| l.replace('"', "")).any(|l| {
                        l.contains(" audit:")
                            && l.contains(who)
                            && l.contains(call)
                            && l.contains(args)
                            && l.contains(result)
                    })
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

/// Runs `asyncorectl --control CONTROL ARGS` and returns its exit code and
/// stderr.
fn ctl_at(control: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = output_within(
        Command::new(binary("asyncorectl")).arg("--control").arg(control).args(args).env_remove("ASYNCORED_TOKEN"),
    );
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn tls_on_a_non_loopback_address_needs_no_token_file_and_asyncorectl_reaches_it_with_its_ca() {
    let pki = Pki::new();
    // 0.0.0.0 with TLS and no token file: allowed.
    let daemon = Daemon::start_with(Options {
        config: pki.config(false),
        control: Some("0.0.0.0:0".into()),
        http: Some("0.0.0.0:0".into()),
        ..Options::default()
    });
    let control = reach(daemon.control());
    let ca = pki.path("ca.pem");
    // Allowed, but whoever completes the handshake is admin: said at start.
    for what in ["control api", "http api"] {
        let warned = |log: String| {
            log.lines().any(|l| {
                l.contains("WARN")
                    && l.contains(&format!("the {what} on 0.0.0.0:"))
                    && l.contains("neither a token file")
            })
        };
        runtime().block_on(eventually!(async || warned(daemon.log()), "a warning for the {what}:\n{}", daemon.log()));
    }
    runtime().block_on(async {
        let http = reach(http_address_of(&daemon).await);
        // Plain clients against the TLS ports: no answer.
        let plain = Target::Tcp { control, http, tls: false };
        let plain_grpc = within("a plain gRPC call on a TLS port", async {
            let channel = Endpoint::from_shared(plain.grpc_uri(false)).unwrap().timeout(patience()).connect().await;
            match channel {
                Ok(channel) => {
                    ListenersClient::new(channel).list_listeners(v1::ListListenersRequest::default()).await.err()
                }
                Err(_) => Some(tonic::Status::unavailable("no connection")),
            }
        })
        .await;
        assert!(plain_grpc.is_some(), "a plain gRPC client was answered over a TLS port");
        let plain_http = reqwest::Client::builder().timeout(patience()).build().unwrap();
        assert!(plain_http.get(format!("http://{http}/v1/listeners")).send().await.is_err());
        // TLS clients trusting the CA: answered.
        let tls = Target::Tcp { control, http, tls: true };
        assert_eq!(grpc_call(&tls, &pki, C::None, GrpcRead).await, Grpc(Code::Ok));
        assert_eq!(http_call(&tls, &pki, C::None, HttpGet).await, Http(200));
        // Over TLS the Host may be any name (the handshake checked the one
        // the client used); a foreign Origin is still refused.
        for (origin, wanted) in [("", 200), ("https://evil.example", 403), ("http://asyncored.example", 403)] {
            let mut request = http_request("asyncored.example", origin, C::None, HttpPostForeignOrigin);
            if origin.is_empty() {
                request = request.replace("origin: \r\n", "");
            }
            let connector = tokio_rustls::TlsConnector::from(pki.rustls_client(None, b"http/1.1"));
            let answer = within("an HTTP answer over TLS", async {
                let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
                let stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
                exchange(stream, &request).await.expect("an answer")
            })
            .await;
            assert_eq!(http_status_of(HttpPost, &answer), Http(wanted), "Origin {origin:?}: {answer}");
        }
    });

    // asyncorectl with --ca: host:port becomes https://, and so does https:// itself.
    let (code, stderr) = ctl_at(&control.to_string(), &["--ca", &ca, "listeners", "ls"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = ctl_at(&format!("https://localhost:{}", control.port()), &["--ca", &ca, "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    // Without --ca: one line, a usage error.
    let (code, stderr) = ctl_at(&format!("https://{control}"), &["listeners", "ls"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--ca FILE"), "{stderr}");
    // A CA that did not sign the daemon's certificate: one line, unreachable.
    let (code, stderr) = ctl_at(&control.to_string(), &["--ca", &pki.path("client.pem"), "listeners", "ls"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("asyncorectl: cannot reach the daemon at"), "{stderr}");
    // Plain gRPC against the TLS port: one line, unreachable (usually with
    // a hint to give --ca, when the TLS alert was read as HTTP/2; a reset
    // may come first).
    let (code, stderr) = ctl_at(&control.to_string(), &["--timeout", "3s", "listeners", "ls"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // A CA file that is not PEM: one line naming it, a usage error.
    let (code, stderr) = ctl_at(&control.to_string(), &["--ca", &pki.path("server.key"), "listeners", "ls"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("server.key: no PEM certificate"), "{stderr}");
}

#[test]
fn mutual_tls_needs_a_certificate_of_the_client_ca_which_is_admin_and_audited() {
    let pki = Pki::new();
    let daemon = Daemon::start_with(Options {
        config: pki.config(true),
        control: Some("0.0.0.0:0".into()),
        http: Some("0.0.0.0:0".into()),
        ..Options::default()
    });
    let control = reach(daemon.control());
    runtime().block_on(async {
        let http = reach(http_address_of(&daemon).await);
        let target = Target::Tcp { control, http, tls: true };
        // Without a certificate the handshake fails, even with the CA trusted.
        assert_eq!(grpc_call(&target, &pki, C::None, GrpcRead).await, NoConnection);
        assert_eq!(http_call(&target, &pki, C::None, HttpGet).await, NoConnection);
        // A certificate of another CA fails too.
        let foreign = pki.rustls_client(Some((&pki.foreign_cert, &pki.foreign_key)), b"http/1.1");
        let request = http_request(&http.to_string(), "", C::None, HttpGet);
        let answer = within("an HTTP answer to a foreign certificate", async {
            let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
            match tokio_rustls::TlsConnector::from(foreign)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
            {
                Ok(stream) => exchange(stream, &request).await,
                Err(_) => None,
            }
        })
        .await;
        assert_eq!(answer, None, "a certificate of another CA was answered");
        // With the client certificate: admin, on both APIs, and audited by its CN.
        assert_eq!(grpc_call(&target, &pki, C::ClientCert, GrpcMutation).await, Grpc(Code::Ok));
        assert_eq!(http_call(&target, &pki, C::ClientCert, HttpPost).await, Http(200));
        let wanted = ["call=asyncore.v1.Listeners/SetDaemonLimits", "call=POST /v1/listeners:setLimits"];
        eventually!(
            async || {
                let log = daemon.log();
                wanted.iter().all(|call| {
                    log.lines()
                        .map(|l| l.replace('"', ""))
                        .any(|l| l.contains(" audit:") && l.contains("who=cert:ops-laptop") && l.contains(call))
                })
            },
            "the audit lines of {wanted:?} by cert:ops-laptop in the log:\n{}",
            daemon.log()
        )
        .await;
    });
    // asyncorectl with its certificate; without one it fails in one line.
    let ca = pki.path("ca.pem");
    let (client_cert, client_key) = (pki.path("client.pem"), pki.path("client.key"));
    let with_cert = ["--ca", &ca, "--client-cert", &client_cert, "--client-key", &client_key];
    let (code, stderr) = ctl_at(&control.to_string(), &[&with_cert[..], &["config", "reload"]].concat());
    assert_eq!(code, Some(0), "a mutation with the client certificate: {stderr}");
    let (code, stderr) = ctl_at(&control.to_string(), &[&with_cert[..], &["listeners", "ls"]].concat());
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = ctl_at(&control.to_string(), &["--ca", &ca, "listeners", "ls"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The certificate the daemon's HTTP API presents in a new handshake.
async fn presented_cert(pki: &Pki, http: SocketAddr) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client(None, b"http/1.1"));
    within("a TLS handshake", async {
        let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec()
    })
    .await
}

#[test]
fn a_config_reload_reads_the_token_file_and_the_tls_files_again() {
    let pki = Pki::new();
    let tokens = TempDir::new("security-rotate");
    let token_file = token_file(&tokens);
    let daemon = Daemon::start_with(Options {
        config: format!("{}token_file = {token_file:?}\n", pki.config(false)),
        ..Options::default()
    });
    let ca = pki.path("ca.pem");
    let control = daemon.control().to_string();
    let ctl = |secret: &str, args: &[&str]| {
        let mut command = Command::new(binary("asyncorectl"));
        command.args(["--control", &control, "--ca", &ca]).args(args).env("ASYNCORED_TOKEN", secret);
        let output = output_within(&mut command);
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.code(), text(&output.stdout), text(&output.stderr))
    };
    let http = runtime().block_on(http_address_of(&daemon));
    let first_cert = runtime().block_on(presented_cert(&pki, http));

    // Rotated: the admin token revoked and another issued, the certificate
    // renewed. Nothing changes until the reload.
    const NEW_SECRET: &str = "rotated-admin-secret-0123456789";
    std::fs::write(&token_file, format!("ops2 admin {NEW_SECRET}\nviewer read {READ_SECRET}\n")).unwrap();
    let renewed = pki.issue_server_cert("asyncored renewed");
    assert_eq!(runtime().block_on(presented_cert(&pki, http)), first_cert);
    assert_eq!(ctl(NEW_SECRET, &["info"]).0, Some(1), "the new token is not in force yet");

    let (code, stdout, stderr) = ctl(ADMIN_SECRET, &["config", "reload"]);
    assert_eq!(code, Some(0), "{stderr}");
    let pem = pki.path("server.pem");
    assert!(stdout.contains(&format!("read again and in force: token_file {token_file}, tls_cert {pem}")), "{stdout}");
    assert_eq!(runtime().block_on(presented_cert(&pki, http)), renewed, "new handshakes present the renewed one");
    let (code, _, stderr) = ctl(ADMIN_SECRET, &["info"]);
    assert_eq!(code, Some(1), "the revoked token");
    assert!(stderr.starts_with("asyncorectl: unauthenticated: "), "{stderr}");
    assert_eq!(ctl(NEW_SECRET, &["listeners", "ls"]).0, Some(0), "the new token");
    assert_eq!(ctl(READ_SECRET, &["info"]).0, Some(0), "the kept token");

    // A token file that no longer parses, or a key that is not PEM, fails
    // the reload, naming it, and what is in force stays.
    std::fs::write(&token_file, format!("ops2 superuser {NEW_SECRET}\n")).unwrap();
    let (code, _, stderr) = ctl(NEW_SECRET, &["config", "reload"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains(&format!("token file {token_file}: line 1: level \"superuser\"")), "{stderr}");
    assert!(stderr.contains("nothing changed: the tokens, certificates and config in force stay"), "{stderr}");
    assert_eq!(ctl(NEW_SECRET, &["listeners", "ls"]).0, Some(0), "still in force");
    std::fs::write(&token_file, format!("ops3 admin {NEW_SECRET}\n")).unwrap();
    let key = pki.path("server.key");
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    let (code, _, stderr) = ctl(NEW_SECRET, &["config", "reload"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains(&format!("TLS key {key}")), "{stderr}");
    assert_eq!(runtime().block_on(presented_cert(&pki, http)), renewed, "the certificate in force stays");

    // Credentials that load are put in force even when the config file
    // cannot be applied: a revoked token does not wait for a listener.
    std::fs::write(&key, good_key).unwrap();
    let config = daemon.dir().join("asyncored.toml");
    let good_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good_config}\n[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"nope\"\n"))
        .unwrap();
    std::fs::write(&token_file, format!("ops4 admin {NEW_SECRET}4\n")).unwrap();
    let (code, _, stderr) = ctl(NEW_SECRET, &["config", "reload"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(stderr.contains(&format!("(token_file {token_file}, tls_cert {pem} read again and in force)")), "{stderr}");
    assert_eq!(ctl(NEW_SECRET, &["info"]).0, Some(1), "revoked although the config was refused");
    assert_eq!(ctl(&format!("{NEW_SECRET}4"), &["info"]).0, Some(0));
    let log = daemon.log();
    assert!(log.contains("token file read again: its 2 tokens are in force"), "{log}");
}

#[test]
fn a_bad_tls_file_stops_the_start_in_one_line_naming_it() {
    let pki = Pki::new();
    let dir = TempDir::new("security-bad-tls");
    let config = dir.path().join("asyncored.toml");
    std::fs::write(&config, "control = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nplugin_dirs = []\nlistener = []\n")
        .unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.display().to_string();
    let (cert, key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--tls-cert", "/nonexistent/cert.pem", "--tls-key", &key], "/nonexistent/cert.pem"),
        (vec!["--tls-cert", &not_pem, "--tls-key", &key], "no PEM certificate"),
        (vec!["--tls-cert", &cert, "--tls-key", &not_pem], "no PEM private key"),
        (vec!["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &not_pem], "client CA"),
        (vec!["--client-ca", &ca], "needs TLS"),
    ];
    for (flags, wanted) in cases {
        let output = output_within(Command::new(binary("asyncored")).arg("--config").arg(&config).args(&flags));
        assert!(!output.status.success(), "{flags:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("asyncored:")).collect();
        assert_eq!(lines.len(), 1, "{flags:?}: {stderr}");
        assert!(lines[0].contains(wanted), "{flags:?}: {stderr}");
    }
}
