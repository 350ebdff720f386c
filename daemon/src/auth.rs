//! Who may call the control plane: bearer tokens with two levels, as
//! HAProxy's runtime socket has them, checked on every gRPC and HTTP call;
//! and the audit log of every call that changes something.
//!
//! The token file (`--token-file`, `token_file`) has one token a line,
//! `name level secret`, `level` being `read` (list, get, watch, metrics,
//! loop stats, daemon info, reflection) or `admin` (everything, the calls
//! that change state included). Blank lines and lines starting with `#` are
//! skipped. Secrets are compared in constant time, against every token.
//!
//! A config reload (SIGHUP, `ReloadConfig`) reads the token file again:
//! tokens can be added, revoked and rotated without a restart. A file
//! that no longer parses fails the reload, and the tokens in force stay.
//!
//! Without a token file every call is allowed, as it always was: the
//! control plane is then on loopback only, or behind TLS
//! ([`check_exposure`]). With one,
//! every call needs `authorization: Bearer SECRET`, except the health
//! checks (`grpc.health.v1`, `/healthz`, `/readyz`) and, with
//! `metrics_public`, `/metrics`. A missing or unknown token is
//! UNAUTHENTICATED (HTTP 401); a read token on a mutation is
//! PERMISSION_DENIED (HTTP 403).
//!
//! Over TLS with `--client-ca` ([`crate::tls`]), a client that presented a
//! certificate the CA signed is admin, whatever its token: it needs none.
//! A client without a certificate (let through the handshake only when a
//! token file is configured) is checked by its token as above.
//!
//! Every mutation, allowed or not, writes one line at info level with
//! target `audit`: `peer` (the client's address), `who` (the token's name,
//! `cert:CN` for a client certificate, or `anonymous`), `call` (the RPC, or
//! the HTTP method, path and query), `args` (the request's fields, cut to
//! [`crate::config::MAX_ECHO_CHARS`]; empty for a call refused before its
//! handler ran) and `result` (`ok`, or the gRPC code or HTTP status).

use std::{
    cell::RefCell,
    fmt::Debug,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
};

use anyhow::Context as _;
use axum::http::{self, HeaderMap, HeaderValue, header};
use tonic::{Code, Status};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Read: list, get, watch, metrics.
    Read,
    /// Everything, the calls that change state included.
    Admin,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: health checks (and `/metrics` when public).
    Nothing,
    /// A token of at least this level.
    Level(Level),
}

#[derive(Clone)]
struct Token {
    name: String,
    level: Level,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Token").field("name", &self.name).field("level", &self.level).finish_non_exhaustive()
    }
}

/// The tokens of a daemon; none when no token file is configured (every
/// call is then allowed).
#[derive(Debug, Default)]
pub(crate) struct Auth {
    /// The token file, read again by a config reload.
    file: Option<PathBuf>,
    /// The tokens in force: never empty with a file. The lock is held only
    /// to clone the `Arc` (a reload swaps it).
    tokens: RwLock<Arc<Vec<Token>>>,
    metrics_public: bool,
}

/// Tokens read from the token file and checked, not yet in force.
#[derive(Debug)]
pub(crate) struct FreshTokens(Vec<Token>);

/// The caller, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Who {
    /// No token was needed, or none is configured.
    Anonymous,
    /// The token of this name.
    Token(String),
    /// A verified client certificate of this name (its CN, or
    /// `sha256:HEX`): admin.
    Cert(String),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Anonymous => f.write_str("anonymous"),
            Who::Token(name) => f.write_str(name),
            Who::Cert(name) => write!(f, "cert:{name}"),
        }
    }
}

/// A refused call: UNAUTHENTICATED or PERMISSION_DENIED, and who it was
/// (for the audit line).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: Status,
    pub(crate) who: Who,
}

impl Auth {
    /// The tokens of `token_file` (none without one).
    ///
    /// # Errors
    ///
    /// If the file cannot be read, a line is not `name level secret`, a
    /// level is neither `read` nor `admin`, or a name repeats; the message
    /// names the file and the line, never a secret.
    pub(crate) fn load(token_file: Option<&Path>, metrics_public: bool) -> anyhow::Result<Auth> {
        let tokens = match token_file {
            Some(path) => read_tokens(path)?,
            None => Vec::new(),
        };
        Ok(Auth { file: token_file.map(Path::to_owned), tokens: RwLock::new(Arc::new(tokens)), metrics_public })
    }

    /// Whether tokens are required.
    pub(crate) fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the token file again (`None` without one), for
    /// [`replace`](Auth::replace) once the rest of a reload succeeded.
    ///
    /// # Errors
    ///
    /// As [`load`](Auth::load)'s.
    pub(crate) fn reread(&self) -> anyhow::Result<Option<FreshTokens>> {
        self.file.as_deref().map(|path| read_tokens(path).map(FreshTokens)).transpose()
    }

    /// Puts `fresh` in force: calls from now on are checked against them.
    /// Returns the token file and how many tokens it has.
    pub(crate) fn replace(&self, fresh: FreshTokens) -> (&Path, usize) {
        let n = fresh.0.len();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh.0);
        (self.file.as_deref().unwrap_or(Path::new("")), n)
    }

    /// Checks the `authorization` header of a call that needs `need`; a
    /// verified client certificate (`client_cert`, its name) allows every
    /// call.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        need: Need,
        call: &str,
        client_cert: Option<&str>,
    ) -> Result<Who, Refusal> {
        if let Some(name) = client_cert {
            return Ok(Who::Cert(name.to_owned()));
        }
        if !self.enabled() {
            return Ok(Who::Anonymous);
        }
        let level = match need {
            Need::Nothing => return Ok(Who::Anonymous),
            Need::Level(level) => level,
        };
        let refuse = |status, who| Err(Refusal { status, who });
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return refuse(
                Status::unauthenticated(format!("{call} needs a token: send authorization: Bearer <secret>")),
                Who::Anonymous,
            );
        };
        let Some(secret) = bearer(value) else {
            return refuse(
                Status::unauthenticated("the authorization header is not \"Bearer <secret>\""),
                Who::Anonymous,
            );
        };
        let Some(token) = self.find(secret) else {
            return refuse(Status::unauthenticated("the bearer token is not valid"), Who::Anonymous);
        };
        let who = Who::Token(token.name.clone());
        if token.level < level {
            return refuse(
                Status::permission_denied(format!(
                    "token {:?} is read-only; {call} needs an admin token",
                    crate::config::excerpt(&token.name)
                )),
                who,
            );
        }
        Ok(who)
    }

    /// The token whose secret is `secret`: every token is compared, each in
    /// constant time, so the time taken tells nothing of which matched.
    fn find(&self, secret: &[u8]) -> Option<Token> {
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner).clone();
        let mut found = None;
        for token in tokens.iter() {
            if constant_time_eq(&token.secret, secret) {
                found = Some(token);
            }
        }
        found.cloned()
    }

    /// What an HTTP request needs: health checks and the status page's document nothing, `/metrics`
    /// nothing when public, other GETs read, everything else admin.
    pub(crate) fn http_need(&self, method: &http::Method, path: &str) -> Need {
        match (method.as_str(), path) {
            // The status page's document: no data, which its script asks
            // the API for with a token.
            ("GET" | "HEAD", "/healthz" | "/readyz" | "/") => Need::Nothing,
            ("GET" | "HEAD", "/metrics") if self.metrics_public => Need::Nothing,
            ("GET" | "HEAD", _) => Need::Level(Level::Read),
            _ => Need::Level(Level::Admin),
        }
    }
}

/// What a gRPC method (`/package.Service/Method`) needs: health nothing;
/// reflection, `List*`, `Get*` and `Watch*` read; every other method of
/// ours admin (and an unknown path admin too, which then answers
/// UNIMPLEMENTED only to an admin).
pub(crate) fn grpc_need(path: &str) -> Need {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    if service == "grpc.health.v1.Health" {
        Need::Nothing
    } else if service.starts_with("grpc.reflection.")
        || ["List", "Get", "Watch"].iter().any(|prefix| method.starts_with(prefix))
    {
        Need::Level(Level::Read)
    } else {
        Need::Level(Level::Admin)
    }
}

/// The secret of `Bearer SECRET` (the scheme in any case).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let scheme = b"bearer ";
    if bytes.len() <= scheme.len() || !bytes[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    let secret = bytes[scheme.len()..].trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

/// Equality whose time depends on the lengths only, not on where the bytes
/// differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The tokens of the token file at `path`, checked.
fn read_tokens(path: &Path) -> anyhow::Result<Vec<Token>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    parse_tokens(&text).map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))
}

fn parse_tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens: Vec<Token> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, level, secret] = fields[..] else {
            return Err(format!("line {number}: expected `name level secret` (3 fields), found {}", fields.len()));
        };
        let level = match level {
            "read" => Level::Read,
            "admin" => Level::Admin,
            other => {
                return Err(format!(
                    "line {number}: level {:?}: expected read or admin",
                    crate::config::excerpt(other)
                ));
            }
        };
        if secret.len() < 16 {
            return Err(format!("line {number}: the secret of {name:?} is shorter than 16 characters"));
        }
        if tokens.iter().any(|token| token.name == name) {
            return Err(format!("line {number}: token name {name:?} repeats"));
        }
        if tokens.iter().any(|token| token.secret == secret.as_bytes()) {
            return Err(format!("line {number}: the secret of {name:?} is another token's too"));
        }
        tokens.push(Token { name: name.to_owned(), level, secret: secret.as_bytes().to_vec() });
    }
    if tokens.is_empty() {
        return Err("no token in it (lines are `name level secret`)".to_owned());
    }
    Ok(tokens)
}

/// Refuses to serve `what` on `address` when it is not loopback and
/// neither TLS nor a token protects it. TLS alone (no token file, no client
/// CA) is allowed but warned of: whoever completes the handshake is admin.
///
/// # Errors
///
/// One line saying why and what to do.
pub(crate) fn check_exposure(
    what: &str,
    address: SocketAddr,
    auth: &Auth,
    tls: bool,
    client_ca: bool,
) -> anyhow::Result<()> {
    if address.ip().is_loopback() || auth.enabled() {
        return Ok(());
    }
    if tls {
        if !client_ca {
            tracing::warn!(
                "the {what} on {address} is served over TLS with neither a token file nor a client CA: \
                 every client that completes the handshake may change anything; add --token-file or --client-ca"
            );
        }
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve the {what} on {address}, which is not a loopback address, without authentication: \
         configure TLS (--tls-cert and --tls-key, with --client-ca for client certificates), a token file \
         (--token-file), or listen on 127.0.0.1"
    )
}

/// Writes one audit line for a mutation.
pub(crate) fn audit(peer: &str, who: &Who, call: &str, args: &str, result: &str) {
    tracing::info!(target: "audit", peer, who = %who, call, args, result, "control plane call");
}

tokio::task_local! {
    /// The fields of the request being served, as its handler noted them
    /// ([`note_arguments`]) for the audit line ([`audited`]).
    static ARGUMENTS: RefCell<String>;
}

/// Notes `request`'s fields for the audit line of the call being served.
/// The gRPC handlers note theirs, which serves the HTTP routes too, since
/// they call the same handlers. Outside an audited call (a config reload
/// by SIGHUP, the state restored at start) it does nothing.
pub(crate) fn note_arguments(request: &impl Debug) {
    let _outside = ARGUMENTS.try_with(|args| {
        *args.borrow_mut() = crate::config::excerpt(&format!("{request:?}")).into_owned();
    });
}

/// Runs the call `serve`, and gives what it answered with the arguments its
/// handler noted.
pub(crate) async fn audited<T>(serve: impl Future<Output = T>) -> (T, String) {
    ARGUMENTS
        .scope(RefCell::default(), async {
            let answer = serve.await;
            (answer, ARGUMENTS.with(|args| args.take()))
        })
        .await
}

/// The tower layer of the gRPC server: checks the token of every call
/// ([`grpc_need`]), and writes the audit line of every mutation.
#[derive(Debug, Clone)]
pub(crate) struct GrpcAuthLayer(pub(crate) Arc<Auth>);

impl<S> tower_layer::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth { auth: self.0.clone(), inner }
    }
}

/// [`GrpcAuthLayer`]'s service.
#[derive(Debug, Clone)]
pub(crate) struct GrpcAuth<S> {
    auth: Arc<Auth>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for GrpcAuth<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let need = grpc_need(&path);
        let extensions = request.extensions();
        let address = |remote: Option<SocketAddr>| remote.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let mut client_cert = None;
        let peer = if let Some(info) = extensions.get::<tonic::transport::server::TcpConnectInfo>() {
            address(info.remote_addr())
        } else if let Some(info) = extensions.get::<crate::tls::TlsConnectInfo>() {
            client_cert = info.client_cert.clone();
            address(info.remote)
        } else if extensions.get::<tonic::transport::server::UdsConnectInfo>().is_some() {
            "unix".to_owned()
        } else {
            "unknown".to_owned()
        };
        let call = path.trim_start_matches('/').to_owned();
        let mutation = need == Need::Level(Level::Admin);
        match self.auth.check(request.headers(), need, &call, client_cert.as_deref()) {
            Err(refusal) => {
                if mutation || refusal.status.code() == Code::Unauthenticated {
                    audit(&peer, &refusal.who, &call, "", code_name(refusal.status.code()));
                }
                Box::pin(std::future::ready(Ok(refusal.status.into_http())))
            }
            Ok(who) => {
                // The clone that was made ready is the one called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let (response, args) = audited(inner.call(request)).await;
                    let response = response?;
                    if mutation {
                        // A unary handler's error is a trailers-only answer:
                        // its status is in the headers.
                        let result = match response.headers().get("grpc-status") {
                            Some(code) if code != "0" => {
                                let code = code.to_str().ok().and_then(|c| c.parse::<i32>().ok()).unwrap_or(2);
                                code_name(Code::from_i32(code))
                            }
                            _ => "ok",
                        };
                        audit(&peer, &who, &call, &args, result);
                    }
                    Ok(response)
                })
            }
        }
    }
}

/// The name of a gRPC code, for the audit line.
pub(crate) fn code_name(code: Code) -> &'static str {
    crate::http::http_status(code).1
}

/// The host names a mutation's `Host` may carry besides the listen address.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks an HTTP mutation's `Host` and `Origin`: the Host must be a
/// loopback name or address, or the address the API listens on; an Origin,
/// if sent (browsers send it on every cross-site POST), must be
/// `SCHEME://HOST` of that same Host (`scheme` is `https` over TLS). So a page of another site, or one that
/// made a name of its own resolve to 127.0.0.1, is refused.
///
/// On a Unix socket, over TLS and with tokens, `listen` is `None` and any
/// Host is accepted: no browser reaches a Unix socket, over TLS a browser
/// completes the handshake only for a name the certificate carries, which
/// no other site's page can make its own, and a token is never sent by a
/// browser on its own.
pub(crate) fn check_host_origin(headers: &HeaderMap, listen: Option<SocketAddr>, scheme: &str) -> Result<(), String> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if let Some(listen) = listen
        && host != listen.to_string()
        && !loopback_host(host)
    {
        return Err(format!(
            "Host {:?} is not this daemon's address: send Host: {listen} (or a loopback name)",
            crate::config::excerpt(host)
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if origin != format!("{scheme}://{host}") {
            return Err(format!(
                "Origin {:?} is not this daemon's own: cross-site requests are refused",
                crate::config::excerpt(origin)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn token_lines() {
        let tokens = parse_tokens("# ops\nalice admin 0123456789abcdef0\n\nbob read fedcba98765432100\n").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[1].level, Level::Read);
        assert!(parse_tokens("alice root 0123456789abcdef0").unwrap_err().contains("read or admin"));
        assert!(parse_tokens("alice admin").unwrap_err().contains("3 fields"));
        assert!(parse_tokens("alice admin short").unwrap_err().contains("shorter"));
        assert!(parse_tokens("").unwrap_err().contains("no token"));
    }

    #[test]
    fn tokens_read_again_are_in_force_once_replaced_and_a_bad_file_changes_nothing() {
        let path = std::env::temp_dir().join(format!("asyncored-auth-test-{}", std::process::id()));
        std::fs::write(&path, "a admin aaaaaaaaaaaaaaaa\n").unwrap();
        let auth = Auth::load(Some(&path), false).unwrap();
        let bearer = |secret: &str| headers(&[("authorization", &format!("Bearer {secret}"))]);
        let admin = Need::Level(Level::Admin);
        assert!(auth.check(&bearer("aaaaaaaaaaaaaaaa"), admin, "x", None).is_ok());

        std::fs::write(&path, "b admin bbbbbbbbbbbbbbbb\n").unwrap();
        let fresh = auth.reread().unwrap().unwrap();
        assert!(auth.check(&bearer("aaaaaaaaaaaaaaaa"), admin, "x", None).is_ok(), "not before replace");
        assert_eq!(auth.replace(fresh), (path.as_path(), 1));
        assert!(auth.check(&bearer("aaaaaaaaaaaaaaaa"), admin, "x", None).is_err());
        assert_eq!(auth.check(&bearer("bbbbbbbbbbbbbbbb"), admin, "x", None).unwrap(), Who::Token("b".into()));

        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(auth.reread().unwrap_err().to_string().contains("no token in it"));
        assert!(auth.check(&bearer("bbbbbbbbbbbbbbbb"), admin, "x", None).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(Auth::load(None, false).unwrap().reread().unwrap().is_none());
    }

    #[test]
    fn levels() {
        let auth = Auth {
            file: Some(PathBuf::from("tokens")),
            tokens: RwLock::new(Arc::new(parse_tokens("a admin aaaaaaaaaaaaaaaa\nr read rrrrrrrrrrrrrrrr").unwrap())),
            metrics_public: false,
        };
        let admin = Need::Level(Level::Admin);
        assert_eq!(
            auth.check(&headers(&[("authorization", "Bearer aaaaaaaaaaaaaaaa")]), admin, "x", None).unwrap(),
            Who::Token("a".into())
        );
        let refused =
            auth.check(&headers(&[("authorization", "Bearer rrrrrrrrrrrrrrrr")]), admin, "x", None).unwrap_err();
        assert_eq!(refused.status.code(), Code::PermissionDenied);
        let refused = auth.check(&headers(&[("authorization", "Bearer nope")]), admin, "x", None).unwrap_err();
        assert_eq!(refused.status.code(), Code::Unauthenticated);
        assert_eq!(auth.check(&headers(&[]), Need::Nothing, "x", None).unwrap(), Who::Anonymous);
        // A verified client certificate is admin, with or without a token.
        let by_cert = auth.check(&headers(&[("authorization", "Bearer nope")]), admin, "x", Some("ops")).unwrap();
        assert_eq!(by_cert.to_string(), "cert:ops");
        assert_eq!(grpc_need("/asyncore.v1.Listeners/ListListeners"), Need::Level(Level::Read));
        assert_eq!(grpc_need("/asyncore.v1.Listeners/StartListener"), admin);
        assert_eq!(grpc_need("/grpc.health.v1.Health/Check"), Need::Nothing);
    }

    #[test]
    fn host_and_origin() {
        let listen = Some("127.0.0.1:8080".parse().unwrap());
        assert!(check_host_origin(&headers(&[("host", "127.0.0.1:8080")]), listen, "http").is_ok());
        assert!(check_host_origin(&headers(&[("host", "localhost:8080")]), listen, "http").is_ok());
        assert!(check_host_origin(&headers(&[("host", "[::1]:8080")]), listen, "http").is_ok());
        assert!(check_host_origin(&headers(&[("host", "evil.example:8080")]), listen, "http").is_err());
        let cross = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.example")]);
        assert!(check_host_origin(&cross, listen, "http").is_err());
        let own = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")]);
        assert!(check_host_origin(&own, listen, "http").is_ok());
        assert!(check_host_origin(&own, listen, "https").is_err(), "over TLS the origin is https://");
        let tls = headers(&[("host", "127.0.0.1:8080"), ("origin", "https://127.0.0.1:8080")]);
        assert!(check_host_origin(&tls, listen, "https").is_ok());
    }
}
