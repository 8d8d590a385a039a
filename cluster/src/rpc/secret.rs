//! The shared cluster secret, as RabbitMQ's Erlang cookie: every process of
//! a cluster reads the same secret file. Without `--cluster-secret-file` a
//! process uses a per-user file in a well-known place and creates it (mode
//! 0600) on first start, so processes on one machine form a cluster with no
//! extra flag; for several machines the operator copies that file.
//!
//! The key is the file's content with surrounding whitespace removed (at
//! least 16 bytes); a created file holds 32 random bytes in hex.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Error;

/// The file name inside the per-user directory.
const SECRET_FILE_NAME: &str = "cluster-secret";

/// Shortest secret accepted, in bytes.
const MIN_SECRET_LEN: usize = 16;

/// The shared cluster secret (the HMAC key of the handshake), and the
/// node protocol's TLS when it is enabled ([`Secret::with_tls`]): the
/// credentials every connection of the cluster is opened and accepted with.
#[derive(Clone)]
pub struct Secret {
    key: Arc<[u8]>,
    tls: Option<Arc<crate::tls::NodeTls>>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from bytes (at least 16 bytes).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, Error> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(Error::InvalidSecret(format!(
                "{} bytes; use at least {MIN_SECRET_LEN}",
                bytes.len()
            )));
        }
        Ok(Secret { key: bytes.into(), tls: None })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.key
    }

    /// The same secret, with every connection opened and accepted over
    /// mutual TLS (docs/tls.md); the HMAC handshake runs inside it.
    pub fn with_tls(mut self, tls: crate::tls::NodeTls) -> Secret {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// The node protocol's TLS, if enabled.
    pub fn tls(&self) -> Option<&crate::tls::NodeTls> {
        self.tls.as_deref()
    }

    /// The secret of `--cluster-secret-file` when given (it must exist),
    /// otherwise the per-user default file (see [`Secret::default_dir`]),
    /// created on first use.
    pub fn load_or_create(path: Option<&Path>) -> Result<Secret, Error> {
        match path {
            Some(path) => Secret::load(path),
            None => Secret::load_or_create_in(&Secret::default_dir()?),
        }
    }

    /// The per-user directory of the default secret file:
    /// `$XDG_CONFIG_HOME/sluice` if that variable is set to an absolute
    /// path, else `$HOME/.config/sluice`. The file is `cluster-secret` in it.
    pub fn default_dir() -> Result<PathBuf, Error> {
        if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
            if xdg.is_absolute() {
                return Ok(xdg.join("sluice"));
            }
        }
        match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => {
                Ok(PathBuf::from(home).join(".config").join("sluice"))
            }
            _ => Err(Error::NoSecretLocation),
        }
    }

    /// The default secret file: `cluster-secret` in [`Secret::default_dir`].
    pub fn default_path() -> Result<PathBuf, Error> {
        Ok(Secret::default_dir()?.join(SECRET_FILE_NAME))
    }

    /// Reads a secret file. Refused if group or others may read or write it
    /// (fix: `chmod 600 FILE`), or if the secret is shorter than 16 bytes.
    pub fn load(path: &Path) -> Result<Secret, Error> {
        let file_err = |source| Error::SecretFile { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(file_err)?;
        let mode = file.metadata().map_err(file_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::InsecureSecretFile { path: path.to_path_buf(), mode });
        }
        let mut content = Vec::new();
        file.read_to_end(&mut content).map_err(file_err)?;
        Secret::new(content.trim_ascii().to_vec()).map_err(|e| match e {
            Error::InvalidSecret(why) => Error::InvalidSecret(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// [`Secret::load_or_create`] without a path, with the directory given:
    /// reads `dir/cluster-secret`, or creates it (and `dir`, mode 0700) with
    /// 32 random bytes in hex, mode 0600. Creation is atomic: the content is
    /// written to a temporary file and hard-linked to the final name, which
    /// fails if the name exists, so processes starting together all end up
    /// with the one secret that was linked first.
    pub fn load_or_create_in(dir: &Path) -> Result<Secret, Error> {
        let path = dir.join(SECRET_FILE_NAME);
        match Secret::load(&path) {
            Err(Error::SecretFile { source, .. }) if source.kind() == ErrorKind::NotFound => {}
            other => return other,
        }
        let dir_err = |source| Error::SecretFile { path: dir.to_path_buf(), source };
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(dir_err)?;

        let random: [u8; 32] = rand::random();
        let mut content: String = random.iter().map(|b| format!("{b:02x}")).collect();
        content.push('\n');
        let tag: u64 = rand::random();
        let tmp = dir.join(format!(".{SECRET_FILE_NAME}.{}.{tag:016x}.tmp", std::process::id()));
        let tmp_err = |source| Error::SecretFile { path: tmp.clone(), source };
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(content.as_bytes())?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(tmp_err(e));
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                tracing::info!(path = %path.display(), "created the cluster secret file");
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::SecretFile { path, source: e }),
        }
        Secret::load(&path)
    }
}
