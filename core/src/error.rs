//! The one error type of the library crates: a kind that callers and tests
//! match on, a message that says what to do, and the path or key at fault.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, in terms a caller can act on. Tests assert on these,
/// never on message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file, directory or session that should exist does not.
    NotFound,
    /// The input (a root, a name, a config value, an archive) is not acceptable.
    InvalidInput,
    /// The config file is malformed or has unknown keys.
    Config,
    /// The backend cannot do this here, or at all (see its capabilities).
    Unsupported,
    /// Another session or process holds what this step needs.
    Busy,
    /// A session already exists for this package.
    AlreadyOpen,
    /// A state file is corrupt or truncated.
    Corrupt,
    /// Not enough privileges for the operation.
    Permission,
    /// Any other operating-system error.
    Io,
    /// A backend plugin could not be loaded, or failed inside (a panic).
    Plugin,
}

impl ErrorKind {
    /// A stable lowercase name, used in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::Config => "config",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Busy => "busy",
            ErrorKind::AlreadyOpen => "already-open",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Permission => "permission",
            ErrorKind::Io => "io",
            ErrorKind::Plugin => "plugin",
        }
    }
}

/// An error with its kind, the path it concerns (if any), the error behind
/// it (if any, as [`std::error::Error::source`]) and any error of the
/// cleanup that followed it.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    also: Vec<Error>,
}

/// Result alias used throughout layerpack.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            path: None,
            source: None,
            also: Vec::new(),
        }
    }

    /// Record the error behind this one.
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(cause));
        self
    }

    /// Add the error of a cleanup that failed after this one: both are
    /// reported.
    pub fn also(mut self, cleanup: Error) -> Error {
        self.also.push(cleanup);
        self
    }

    /// An error about `path` caused by an OS error; the kind follows the errno.
    pub fn io(path: impl AsRef<Path>, what: impl Into<String>, source: io::Error) -> Error {
        let kind = match source.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            _ => match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::Permission,
                Some(libc::EBUSY) => ErrorKind::Busy,
                Some(libc::ENOTSUP) | Some(libc::ENOTTY) | Some(libc::EXDEV) => {
                    ErrorKind::Unsupported
                }
                _ => ErrorKind::Io,
            },
        };
        Error {
            kind,
            message: what.into(),
            path: Some(path.as_ref().to_path_buf()),
            source: Some(Box::new(source)),
            also: Vec::new(),
        }
    }

    /// Attach the path this error is about.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Error {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Change the kind (e.g. an `Io` error that means "corrupt" in context).
    pub fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.kind = kind;
        self
    }

    /// Prefix the message with more context.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without path or cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The path this error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) if !self.message.contains(&*p.to_string_lossy()) => {
                write!(f, "{}: {}", p.display(), self.message)?
            }
            _ => f.write_str(&self.message)?,
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        for a in &self.also {
            write!(f, "; cleaning up failed too: {a}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for `Err(Error::new(kind, format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::new($crate::ErrorKind::$kind, format!($($arg)*)))
    };
}
