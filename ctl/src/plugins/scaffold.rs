//! `plugin new`: writes a standalone plugin crate (Cargo.toml, the plugin,
//! a test on the real engine, a README) from the templates in
//! `ctl/templates/plugin`, so that a new plugin starts from code that
//! builds, passes its test and loads into the daemon.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;

use crate::connection::{Refused, io_error_text};
use crate::flags::{NewArgs, OutputFormat};
use crate::render::{print_json, print_text};

/// The checkout this binary was built from, the default `--sdk`: on a
/// developer's machine the new crate then builds against the SDK next to
/// the daemon it will be loaded into.
const BUILT_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

const CARGO_TOML: &str = include_str!("../../templates/plugin/Cargo.toml.tmpl");
const GITIGNORE: &str = include_str!("../../templates/plugin/gitignore.tmpl");
const README: &str = include_str!("../../templates/plugin/README.md.tmpl");
const ECHO_LIB: &str = include_str!("../../templates/plugin/echo.rs.tmpl");
const ECHO_TEST: &str = include_str!("../../templates/plugin/echo_test.rs.tmpl");
const CHAT_LIB: &str = include_str!("../../templates/plugin/chat.rs.tmpl");
const CHAT_TEST: &str = include_str!("../../templates/plugin/chat_test.rs.tmpl");

/// Words that cannot name a crate: Rust's keywords (all editions, reserved
/// ones included, since the crate name is an identifier in `use`), the
/// crates of the standard distribution, the directories Cargo writes next
/// to artifacts, and the two crates the new one depends on.
const RESERVED: &str = "\
    abstract as async await become box break const continue crate do dyn else enum extern false final fn for gen if \
    impl in let loop macro match mod move mut override priv pub ref return self static struct super trait true try \
    type typeof unsafe unsized use virtual where while yield \
    alloc core proc_macro std test \
    build deps examples incremental \
    asyncore_sdk asyncore_testing";

/// crates.io's limit, which is plenty for a name typed on command lines.
const MAX_NAME_LEN: usize = 64;

/// The names one plugin goes by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    /// As the user typed it: the package name and the plugin's `NAME`, which
    /// `listeners start` uses.
    name: String,
    /// `name` with `-` as `_`: the library (`lib{lib_name}.so`) and the
    /// crate path in `use`, where `-` cannot appear.
    lib_name: String,
    /// The `Plugin` type: `my-proto` is `MyProtoPlugin`. The suffix keeps
    /// it clear of the prelude's `Chat`, `Channel` or `Config`.
    type_name: String,
}

impl Names {
    fn new(name: &str) -> Result<Names, Refused> {
        let invalid = |why: &str| Refused(format!("invalid plugin name {name:?}: {why}"));
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(invalid("it must start with a lowercase ASCII letter"));
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
            return Err(invalid("use lowercase ASCII letters, digits, '_' and '-'"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(&format!("it may have at most {MAX_NAME_LEN} characters")));
        }
        let lib_name = name.replace('-', "_");
        if RESERVED.split_whitespace().any(|word| word == lib_name) {
            return Err(invalid("it is reserved by Rust or Cargo, or names a crate the plugin depends on"));
        }
        let mut type_name: String = lib_name
            .split('_')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (first, rest) = part.split_at(1);
                first.to_ascii_uppercase() + rest
            })
            .collect();
        type_name.push_str("Plugin");
        Ok(Names { name: name.to_owned(), lib_name, type_name })
    }
}

/// Where `asyncore-sdk` and `asyncore-testing` come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SdkSource {
    /// A checkout of the asyncored repository, absolute.
    Checkout(PathBuf),
    /// The repository's git URL.
    Git(String),
}

impl SdkSource {
    /// `--sdk`: a URL when it has a scheme or is scp-like (`git@host:path`),
    /// otherwise a directory, which must hold the SDK and the test harness.
    fn from_flag(sdk: Option<&str>) -> Result<SdkSource, Refused> {
        match sdk {
            Some(url) if url.contains("://") || url.starts_with("git@") => Ok(SdkSource::Git(url.to_owned())),
            Some(path) => SdkSource::checkout(Path::new(path))
                .map_err(|why| Refused(format!("--sdk {path}: {why}; pass a checkout of asyncored or its git URL"))),
            None => SdkSource::checkout(Path::new(BUILT_FROM)).map_err(|why| {
                Refused(format!(
                    "asyncorectl was built from {BUILT_FROM}, but {why}; pass --sdk with a checkout of asyncored or its \
                     git URL"
                ))
            }),
        }
    }

    fn checkout(dir: &Path) -> Result<SdkSource, String> {
        let dir = dir.canonicalize().map_err(|error| format!("{}: {}", dir.display(), io_error_text(&error)))?;
        for crate_dir in ["sdk", "testing"] {
            if !dir.join(crate_dir).join("Cargo.toml").is_file() {
                return Err(format!("{} has no {crate_dir}/Cargo.toml", dir.display()));
            }
        }
        if dir.to_str().is_none() {
            return Err(format!("{} is not valid UTF-8, which Cargo.toml cannot hold", dir.display()));
        }
        Ok(SdkSource::Checkout(dir))
    }

    /// The inline table after `asyncore-sdk = ` (`crate_dir` "sdk") or
    /// `asyncore-testing = ` ("testing").
    fn dependency(&self, crate_dir: &str) -> String {
        match self {
            SdkSource::Checkout(dir) => {
                // `checkout` checked that the path is UTF-8.
                let path = dir.join(crate_dir);
                format!("{{ path = {} }}", toml_string(&path.to_string_lossy()))
            }
            SdkSource::Git(url) => format!("{{ git = {} }}", toml_string(url)),
        }
    }
}

/// `plugin new`: refuses a bad name, a non-empty directory or an SDK it
/// cannot find before writing anything, then writes the crate.
///
/// # Errors
///
/// [`Refused`] for those refusals; the I/O error naming the file otherwise.
pub(crate) fn create(args: &NewArgs, format: OutputFormat) -> anyhow::Result<()> {
    let names = Names::new(&args.name)?;
    let sdk = SdkSource::from_flag(args.sdk.as_deref())?;
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&names.name));
    let created_dir = prepare_dir(&dir)?;

    let files = render(&names, &sdk, args.chat);
    let written = files.iter().try_for_each(|(relative, text)| write_file(&dir.join(relative), text));
    // A half-written crate would be refused as "not empty" by the next try.
    written.inspect_err(|_| remove_if_created(&dir, created_dir))?;

    let library =
        format!("target/debug/{}{}.{}", std::env::consts::DLL_PREFIX, names.lib_name, std::env::consts::DLL_EXTENSION);
    match format {
        OutputFormat::Json => print_json(&json!({
            "dir": std::path::absolute(&dir).unwrap_or_else(|_| dir.clone()).display().to_string(),
            "package": names.name,
            "plugin": names.name,
            "library": library,
            "kind": if args.chat { "chat" } else { "echo" },
        })),
        OutputFormat::Table => {
            let shown = dir.display();
            print_text(&format!(
                "created {shown}: cd {shown} && cargo test\nthen: cargo build && asyncorectl plugins load {library} && \
                 asyncorectl listeners start 127.0.0.1:0 {}\n",
                names.name
            ))
        }
    }
}

/// Makes sure `dir` is an empty directory; returns whether it had to be
/// created, so that a failure can take it away again.
fn prepare_dir(dir: &Path) -> anyhow::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Refused(format!("{} exists and is not empty", dir.display())).into());
            }
            Ok(false)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::NotADirectory => {
            Err(Refused(format!("{} exists and is not a directory", dir.display())).into())
        }
        Err(error) => Err(anyhow::anyhow!("cannot read {}: {}", dir.display(), io_error_text(&error))),
    }
}

fn remove_if_created(dir: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dir);
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(path, text).map_err(|error| anyhow::anyhow!("cannot write {}: {}", path.display(), io_error_text(&error)))
}

/// Every file of the crate, by path relative to its directory.
fn render(names: &Names, sdk: &SdkSource, chat: bool) -> Vec<(&'static str, String)> {
    let (lib, test, description) = if chat {
        (CHAT_LIB, CHAT_TEST, "A line protocol: every line comes back uppercased.")
    } else {
        (ECHO_LIB, ECHO_TEST, "An echo server: every byte comes back.")
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", &names.name)
            .replace("{{lib_name}}", &names.lib_name)
            .replace("{{type_name}}", &names.type_name)
            .replace("{{sdk}}", &sdk.dependency("sdk"))
            .replace("{{testing}}", &sdk.dependency("testing"))
            .replace("{{description}}", description)
    };
    vec![
        ("Cargo.toml", fill(CARGO_TOML)),
        (".gitignore", fill(GITIGNORE)),
        ("README.md", fill(README)),
        ("src/lib.rs", fill(lib)),
        ("tests/plugin.rs", fill(test)),
    ]
}

/// A TOML basic string. Control characters other than tab must be escaped
/// there, and `\u` escapes cover them all.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && c != '\t' => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_plugin_name() {
        let names = Names::new("my-proto_2").unwrap();
        assert_eq!(names.name, "my-proto_2");
        assert_eq!(names.lib_name, "my_proto_2");
        assert_eq!(names.type_name, "MyProto2Plugin");
        assert_eq!(Names::new("chat").unwrap().type_name, "ChatPlugin");
        assert_eq!(Names::new("a--b").unwrap().type_name, "ABPlugin");
    }

    #[test]
    fn bad_names_are_refused_in_one_line() {
        for name in ["", "9lives", "_x", "-x", "Echo", "my proto", "naïve", "x.y", "fn", "self", "std", "test", "async"]
        {
            let refused = Names::new(name).unwrap_err().0;
            assert!(refused.starts_with(&format!("invalid plugin name {name:?}: ")), "{refused}");
            assert_eq!(refused.lines().count(), 1, "{refused}");
        }
        assert!(Names::new("asyncore-sdk").is_err());
        assert!(Names::new(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(Names::new(&"x".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn urls_are_git_sources() {
        for url in ["https://example.invalid/asyncored.git", "file:///srv/asyncored", "git@example.invalid:a/b.git"] {
            assert_eq!(SdkSource::from_flag(Some(url)).unwrap(), SdkSource::Git(url.to_owned()));
        }
        let git = SdkSource::Git("https://example.invalid/a\"b".to_owned());
        assert_eq!(git.dependency("sdk"), r#"{ git = "https://example.invalid/a\"b" }"#);
    }

    #[test]
    fn checkouts_must_hold_the_sdk_and_the_harness() {
        let built_from = Path::new(BUILT_FROM).canonicalize().unwrap();
        let source = SdkSource::from_flag(None).unwrap();
        assert_eq!(source, SdkSource::Checkout(built_from.clone()));
        let expected = format!("{{ path = \"{}\" }}", built_from.join("testing").display());
        assert_eq!(source.dependency("testing"), expected);
        // This crate's own directory is no checkout of the repository.
        let refused = SdkSource::from_flag(Some(env!("CARGO_MANIFEST_DIR"))).unwrap_err().0;
        assert!(refused.contains("has no sdk/Cargo.toml"), "{refused}");
    }

    #[test]
    fn templates_are_filled_completely() {
        let names = Names::new("shout-chat").unwrap();
        let sdk = SdkSource::Checkout(PathBuf::from("/src/asyncored"));
        for chat in [false, true] {
            for (path, text) in render(&names, &sdk, chat) {
                assert!(!text.contains("{{") && !text.contains("}}"), "{path} has a placeholder left:\n{text}");
            }
        }
        let files = render(&names, &sdk, true);
        let cargo_toml = &files.iter().find(|(path, _)| *path == "Cargo.toml").unwrap().1;
        assert!(cargo_toml.contains("name = \"shout-chat\""), "{cargo_toml}");
        assert!(cargo_toml.contains("name = \"shout_chat\""), "{cargo_toml}");
        assert!(cargo_toml.contains("asyncore-sdk = { path = \"/src/asyncored/sdk\" }"), "{cargo_toml}");
        assert!(cargo_toml.contains("asyncore-testing = { path = \"/src/asyncored/testing\" }"), "{cargo_toml}");
        let lib = &files.iter().find(|(path, _)| *path == "src/lib.rs").unwrap().1;
        assert!(lib.contains("const NAME: &'static str = \"shout-chat\";"), "{lib}");
        assert!(lib.contains("export_plugin!(ShoutChatPlugin);"), "{lib}");
    }

    #[test]
    fn toml_strings_escape_what_toml_requires() {
        assert_eq!(toml_string("/plain/path"), "\"/plain/path\"");
        assert_eq!(toml_string("a\"b\\c\td"), "\"a\\\"b\\\\c\td\"");
        assert_eq!(toml_string("new\nline\u{7f}"), "\"new\\u000Aline\\u007F\"");
    }
}
