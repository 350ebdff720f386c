//! What is served: the index page at `/` and the files under `root` at
//! `/static/...`, with the checks that keep every path inside that root.
//!
//! Opening and stat'ing a file is synchronous, on the poll loop, like the
//! reads of [`FileProducer`](asyncore_sdk::FileProducer): fine for a local
//! disk and the page cache, not for a root on a slow network filesystem.

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::{
    request::RequestHead,
    response::{Body, Status},
};

const INDEX_PAGE: &[u8] = b"<!DOCTYPE html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><title>asyncored</title></head>
<body>
<h1>asyncored</h1>
<p>This page is served by the <code>http</code> plugin of asyncored, Python's asyncore and asynchat in a Rust daemon.
Files under the listener's <code>root</code> are served at <code>/static/</code>.</p>
</body>
</html>
";

const HTML: &str = "text/html; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to a request, before it becomes a [`Response`](crate::response::Response).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: Status,
    pub(crate) content_type: &'static str,
    pub(crate) body: Body,
}

impl Answer {
    /// An error with its one line of text as the body.
    pub(crate) fn error(status: Status) -> Answer {
        Answer { status, content_type: TEXT, body: Body::Static(status.error_body()) }
    }
}

/// One listener's site.
#[derive(Debug)]
pub(crate) struct Site {
    /// The canonical `root`: no symlink, no `..`, so that a canonical path
    /// under it is really in it.
    root: Option<PathBuf>,
}

impl Site {
    /// A site serving `root`, if given.
    ///
    /// # Errors
    ///
    /// A message naming `root` if it is not a directory that can be
    /// resolved.
    pub(crate) fn new(root: Option<&Path>) -> Result<Site, String> {
        let root = match root {
            None => None,
            Some(root) => {
                let canonical = root.canonicalize().map_err(|e| format!("config root: {}: {e}", root.display()))?;
                if !canonical.is_dir() {
                    return Err(format!("config root: {}: not a directory", root.display()));
                }
                Some(canonical)
            }
        };
        Ok(Site { root })
    }

    /// Answers a complete request head.
    pub(crate) fn answer(&self, head: &RequestHead) -> Answer {
        if !matches!(head.line.method.as_str(), "GET" | "HEAD") {
            return Answer::error(Status::MethodNotAllowed);
        }
        let Some(path) = origin_path(&head.line.target) else {
            return Answer::error(Status::BadRequest);
        };
        if path == "/" {
            return Answer { status: Status::Ok, content_type: HTML, body: Body::Static(INDEX_PAGE) };
        }
        match (path.strip_prefix("/static/"), &self.root) {
            (Some(rest), Some(root)) => self.static_file(root, rest),
            _ => Answer::error(Status::NotFound),
        }
    }

    fn static_file(&self, root: &Path, rest: &str) -> Answer {
        let relative = match sanitize(rest) {
            Ok(relative) => relative,
            Err(status) => return Answer::error(status),
        };
        match resolve(root, &relative) {
            Some((path, len)) => {
                Answer { status: Status::Ok, content_type: content_type(&relative), body: Body::File { path, len } }
            }
            None => Answer::error(Status::NotFound),
        }
    }
}

/// The path of a request target without its query: the target itself in
/// origin form (`/a/b?q`), the part after the authority in absolute form
/// (`http://host/a/b`, which RFC 9112 section 3.2.2 asks servers to
/// accept). `None` for the asterisk and authority forms, which name no
/// resource here.
pub(crate) fn origin_path(target: &str) -> Option<&str> {
    let path = if target.starts_with('/') {
        target
    } else {
        let scheme_end = target.find("://")?;
        if !["http", "https"].iter().any(|scheme| target[..scheme_end].eq_ignore_ascii_case(scheme)) {
            return None;
        }
        let after_scheme = &target[scheme_end + 3..];
        match after_scheme.find(['/', '?']) {
            Some(at) if after_scheme[at..].starts_with('/') => &after_scheme[at..],
            _ => "/",
        }
    };
    Some(path.split_once('?').map_or(path, |(path, _query)| path))
}

/// Turns the part of a path after `/static/` into a relative path that
/// cannot leave the root: each segment is percent-decoded, then `.` and
/// empty segments are dropped, and a `..`, a NUL or a `/` coming out of
/// the decoding is refused. (Symlinks are dealt with by [`resolve`].)
///
/// # Errors
///
/// `400 Bad Request` for a bad percent escape or a refused segment: a
/// client that sends them is probing, not browsing (browsers and curl
/// remove dot segments before sending).
pub(crate) fn sanitize(rest: &str) -> Result<PathBuf, Status> {
    let mut relative = PathBuf::new();
    for segment in rest.split('/') {
        let segment = percent_decode(segment.as_bytes()).ok_or(Status::BadRequest)?;
        match segment.as_slice() {
            b"" | b"." => {}
            b".." => return Err(Status::BadRequest),
            bytes if bytes.contains(&0) || bytes.contains(&b'/') => return Err(Status::BadRequest),
            bytes => relative.push(OsStr::from_bytes(bytes)),
        }
    }
    Ok(relative)
}

/// Decodes `%XX` escapes; `None` if one is not two hex digits. A `+` stays
/// a `+`: it means a space only in form data, not in paths.
pub(crate) fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter();
    while let Some(&b) = bytes.next() {
        if b == b'%' {
            let high = hex_value(*bytes.next()?)?;
            let low = hex_value(*bytes.next()?)?;
            out.push(high << 4 | low);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|v| v as u8)
}

/// The file `relative` names under `root` (canonical) and its length, if
/// it is a regular file whose canonical path is under `root`: a symlink
/// pointing out of the root is not found. `None` for anything else
/// (missing, a directory, a device, unreadable metadata).
///
/// The check and the later open are not atomic: someone who can write
/// under the root can swap a checked file for a symlink before it is
/// opened. The root is trusted to be written only by its owner.
pub(crate) fn resolve(root: &Path, relative: &Path) -> Option<(PathBuf, u64)> {
    let path = root.join(relative).canonicalize().ok()?;
    if !path.starts_with(root) {
        return None;
    }
    let metadata = path.metadata().ok()?;
    metadata.is_file().then_some((path, metadata.len()))
}

/// The `Content-Type` for a file name, from its extension (any case).
pub(crate) fn content_type(path: &Path) -> &'static str {
    let extension = path.extension().and_then(OsStr::to_str).unwrap_or_default().to_ascii_lowercase();
    match extension.as_str() {
        "html" | "htm" => HTML,
        "txt" => TEXT,
        "md" => "text/markdown; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        // RFC 9239.
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    #[test]
    fn origin_paths_drop_the_query_and_the_authority() {
        assert_eq!(origin_path("/"), Some("/"));
        assert_eq!(origin_path("/static/a.txt?v=2"), Some("/static/a.txt"));
        assert_eq!(origin_path("/?"), Some("/"));
        assert_eq!(origin_path("http://example.com/static/a?x"), Some("/static/a"));
        assert_eq!(origin_path("HTTPS://example.com:8443"), Some("/"));
        assert_eq!(origin_path("http://example.com?q=/x"), Some("/"));
        assert_eq!(origin_path("*"), None);
        assert_eq!(origin_path("example.com:443"), None);
        assert_eq!(origin_path("ftp://example.com/x"), None);
        assert_eq!(origin_path("static/a"), None);
    }

    #[test]
    fn percent_escapes_decode_in_either_case() {
        assert_eq!(percent_decode(b"a%20b%2E%2e%2fc+d").as_deref(), Some(&b"a b../c+d"[..]));
        assert_eq!(percent_decode(b"%C3%A9").as_deref(), Some(&b"\xc3\xa9"[..]));
        for bad in [&b"%"[..], b"%2", b"%zz", b"a%g0", b"%%41"] {
            assert_eq!(percent_decode(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn sanitized_paths_stay_relative_and_inside() {
        assert_eq!(sanitize("a.txt"), Ok(PathBuf::from("a.txt")));
        assert_eq!(sanitize("dir//./sub/%61.txt"), Ok(PathBuf::from("dir/sub/a.txt")));
        assert_eq!(sanitize("with%20space"), Ok(PathBuf::from("with space")));
        assert_eq!(sanitize(""), Ok(PathBuf::new()));
        assert_eq!(sanitize("%2e"), Ok(PathBuf::new()));
        for escape in [
            "..",
            "../Cargo.toml",
            "a/../../b",
            "a/..",
            "%2e%2e/x",
            "%2E%2E/x",
            ".%2e/x",
            "..%2fx",
            "a%2f..%2f..%2fb",
            "%2fetc/passwd",
            "a%00.txt",
            "%zz",
            "%",
        ] {
            assert_eq!(sanitize(escape), Err(Status::BadRequest), "{escape}");
        }
        // Whatever comes out is relative and has no parent component, so
        // joining it to the root cannot go up.
        for ok in ["a", "...", "..a", "a..", "%2e%2e%2e", "x/.../y"] {
            let path = sanitize(ok).unwrap();
            assert!(path.is_relative());
            assert!(path.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{ok}: {path:?}");
        }
    }

    #[test]
    fn content_types_come_from_the_extension() {
        let cases = [
            ("index.html", HTML),
            ("INDEX.HTM", HTML),
            ("notes.txt", TEXT),
            ("README.md", "text/markdown; charset=utf-8"),
            ("site.css", "text/css; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("data.json", "application/json"),
            ("logo.png", "image/png"),
            ("photo.JPG", "image/jpeg"),
            ("photo.jpeg", "image/jpeg"),
            ("icon.svg", "image/svg+xml"),
            ("archive.tar.gz", "application/octet-stream"),
            ("Makefile", "application/octet-stream"),
            (".hidden", "application/octet-stream"),
        ];
        for (name, expected) in cases {
            assert_eq!(content_type(Path::new(name)), expected, "{name}");
        }
    }

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("asyncore-http-{label}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolve_keeps_to_regular_files_inside_the_root() {
        let dir = TempDir::new("resolve");
        let root = dir.0.join("root");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/file.txt"), b"inside").unwrap();
        fs::write(dir.0.join("secret.txt"), b"outside").unwrap();
        symlink(root.join("sub/file.txt"), root.join("link-in")).unwrap();
        symlink(dir.0.join("secret.txt"), root.join("link-out")).unwrap();
        symlink(&dir.0, root.join("dir-out")).unwrap();
        // A sibling whose name starts like the root's.
        fs::create_dir_all(dir.0.join("root2")).unwrap();
        fs::write(dir.0.join("root2/x"), b"sibling").unwrap();
        symlink(dir.0.join("root2/x"), root.join("link-sibling")).unwrap();

        let site = Site::new(Some(&root)).unwrap();
        let root = site.root.as_deref().unwrap();
        let found = resolve(root, Path::new("sub/file.txt")).unwrap();
        assert_eq!(found, (root.join("sub/file.txt"), 6));
        assert_eq!(resolve(root, Path::new("link-in")), Some(found));
        for missing in ["link-out", "dir-out/secret.txt", "link-sibling", "sub", "", "nope.txt"] {
            assert_eq!(resolve(root, Path::new(missing)), None, "{missing}");
        }
    }

    #[test]
    fn the_root_must_be_a_directory() {
        let dir = TempDir::new("root-config");
        fs::write(dir.0.join("file"), b"x").unwrap();
        assert!(Site::new(None).is_ok());
        assert!(Site::new(Some(&dir.0)).is_ok());
        let error = Site::new(Some(&dir.0.join("file"))).unwrap_err();
        assert!(error.contains("not a directory"), "{error}");
        let error = Site::new(Some(&dir.0.join("missing"))).unwrap_err();
        assert!(error.starts_with("config root: "), "{error}");
    }
}
