//! Users, their tags and per-vhost permissions: RabbitMQ's internal
//! authentication and authorisation model, as part of the replicated
//! metadata ([`super::MetaState::auth`]), so every gateway of a cluster
//! decides logins and access alike.
//!
//! - Passwords are never stored: a user has RabbitMQ's
//!   `rabbit_password_hashing_sha256` hash, base64 of a 4-byte random salt
//!   followed by SHA-256(salt ‖ password), the format RabbitMQ's definitions
//!   export uses. The salt is drawn by whoever proposes the command
//!   ([`hash_password`]): applying stays deterministic.
//! - Permissions are three regular expressions per (vhost, user):
//!   configure, write, read. A resource is allowed when the expression
//!   matches its name anywhere (as Erlang's `re:run`); the empty expression
//!   matches nothing; the default exchange is named `amq.default`.
//! - [`Auth::bootstrap`] gives a new cluster RabbitMQ's default user.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// RabbitMQ's name of the hashing algorithm ([`hash_password`]).
pub const HASHING_SHA256: &str = "rabbit_password_hashing_sha256";

/// A user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// [`hash_password`]'s output; empty: no password login (only
    /// EXTERNAL, a client certificate).
    pub password_hash: String,
    /// Tags: `administrator`, `monitoring`, `management`, `policymaker`
    /// or any other word (kept, exported, not interpreted).
    pub tags: Vec<String>,
}

/// A user's permissions in one vhost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// Declare and delete.
    pub configure: String,
    /// Publish to exchanges; bind to queues (and exchanges as destination).
    pub write: String,
    /// Consume, get, purge; bind from exchanges.
    pub read: String,
}

impl Permission {
    /// Everything (RabbitMQ's `".*" ".*" ".*"`).
    pub fn all() -> Self {
        Permission { configure: ".*".into(), write: ".*".into(), read: ".*".into() }
    }
}

/// A change to users or permissions. Idempotent where RabbitMQ's
/// commands are not, so a retried proposal does no harm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AuthCommand {
    /// Creates or replaces a user (`add_user`, `change_password`,
    /// `set_user_tags`, a definitions import). `password_hash: None` keeps
    /// the current hash (tags only); `if_absent`: do nothing when the user
    /// exists (seeding from the configuration file).
    PutUser { name: String, password_hash: Option<String>, tags: Option<Vec<String>>, if_absent: bool },
    /// Deletes a user and its permissions.
    DeleteUser { name: String },
    /// `set_permissions`: the vhost and the user must exist.
    SetPermissions { vhost: String, user: String, permission: Permission },
    /// `clear_permissions`.
    ClearPermissions { vhost: String, user: String },
}

/// Why an [`AuthCommand`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AuthError {
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("vhost '{0}' does not exist")]
    NoSuchVhost(String),
    #[error("invalid regular expression '{0}': {1}")]
    BadRegex(String, String),
    #[error("invalid user name: {0}")]
    BadName(String),
}

/// Users and permissions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// By name.
    pub users: BTreeMap<String, User>,
    /// vhost → user → permission.
    pub permissions: BTreeMap<String, BTreeMap<String, Permission>>,
}

impl Auth {
    /// A new cluster's: RabbitMQ's `guest` (password `guest`, tag
    /// administrator, everything on `/`; it may log in from loopback only,
    /// which the gateway enforces).
    pub fn bootstrap(guest_hash: String) -> Self {
        let mut auth = Auth::default();
        auth.users.insert("guest".into(), User { password_hash: guest_hash, tags: vec!["administrator".into()] });
        auth.permissions.entry("/".into()).or_default().insert("guest".into(), Permission::all());
        auth
    }

    /// Applies a command; `vhost_exists` answers for the topology.
    pub fn apply(&mut self, cmd: &AuthCommand, vhost_exists: impl Fn(&str) -> bool) -> Result<(), AuthError> {
        match cmd {
            AuthCommand::PutUser { name, password_hash, tags, if_absent } => {
                if name.is_empty() || name.len() > 255 {
                    return Err(AuthError::BadName(format!("'{name}' (1 to 255 bytes)")));
                }
                match self.users.get_mut(name) {
                    Some(_) if *if_absent => {}
                    Some(user) => {
                        if let Some(h) = password_hash {
                            user.password_hash = h.clone();
                        }
                        if let Some(t) = tags {
                            user.tags = t.clone();
                        }
                    }
                    None => {
                        let user = User {
                            password_hash: password_hash.clone().unwrap_or_default(),
                            tags: tags.clone().unwrap_or_default(),
                        };
                        self.users.insert(name.clone(), user);
                    }
                }
                Ok(())
            }
            AuthCommand::DeleteUser { name } => {
                if self.users.remove(name).is_none() {
                    return Err(AuthError::NoSuchUser(name.clone()));
                }
                for perms in self.permissions.values_mut() {
                    perms.remove(name);
                }
                self.permissions.retain(|_, p| !p.is_empty());
                Ok(())
            }
            AuthCommand::SetPermissions { vhost, user, permission } => {
                if !self.users.contains_key(user) {
                    return Err(AuthError::NoSuchUser(user.clone()));
                }
                if !vhost_exists(vhost) {
                    return Err(AuthError::NoSuchVhost(vhost.clone()));
                }
                for re in [&permission.configure, &permission.write, &permission.read] {
                    compile(re)?;
                }
                self.permissions.entry(vhost.clone()).or_default().insert(user.clone(), permission.clone());
                Ok(())
            }
            AuthCommand::ClearPermissions { vhost, user } => {
                if let Some(p) = self.permissions.get_mut(vhost) {
                    p.remove(user);
                    if p.is_empty() {
                        self.permissions.remove(vhost);
                    }
                }
                Ok(())
            }
        }
    }

    /// A vhost was deleted: its permissions go with it.
    pub fn vhost_deleted(&mut self, vhost: &str) {
        self.permissions.remove(vhost);
    }

    /// Checks a password login: the user if it exists and the password
    /// matches its hash.
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        self.users.get(user).is_some_and(|u| verify_password(&u.password_hash, password))
    }

    /// The user's permission in `vhost`, if any (no entry: no access to
    /// the vhost at all).
    pub fn permission(&self, vhost: &str, user: &str) -> Option<&Permission> {
        self.permissions.get(vhost)?.get(user)
    }
}

/// Compiles a permission expression as RabbitMQ applies it: unanchored.
/// The empty expression is valid and matches nothing ([`Matcher`]).
fn compile(re: &str) -> Result<Option<regex::Regex>, AuthError> {
    if re.is_empty() {
        return Ok(None);
    }
    regex::Regex::new(re).map(Some).map_err(|e| AuthError::BadRegex(re.to_owned(), e.to_string()))
}

/// What kind of access an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    /// RabbitMQ's word for it in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// One (vhost, user)'s permission, compiled.
#[derive(Clone, Debug)]
pub struct Matcher {
    configure: Option<regex::Regex>,
    write: Option<regex::Regex>,
    read: Option<regex::Regex>,
}

impl Matcher {
    /// Compiles `p` (expressions that do not compile, which
    /// [`Auth::apply`] refuses, match nothing).
    pub fn new(p: &Permission) -> Self {
        let c = |re: &str| compile(re).ok().flatten();
        Matcher { configure: c(&p.configure), write: c(&p.write), read: c(&p.read) }
    }

    /// Whether `access` to the resource `name` is allowed (the default
    /// exchange, `""`, is checked as `amq.default`).
    pub fn allows(&self, access: Access, name: &str) -> bool {
        let name = if name.is_empty() { "amq.default" } else { name };
        let re = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        re.as_ref().is_some_and(|re| re.is_match(name))
    }
}

/// RabbitMQ's `rabbit_password_hashing_sha256` with a fresh random salt:
/// base64(salt ‖ SHA-256(salt ‖ password)).
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    hash_password_with_salt(salt, password)
}

/// [`hash_password`] with a given salt (a deterministic default user).
pub fn hash_password_with_salt(salt: [u8; 4], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Whether `password` matches `hash` ([`hash_password`]'s format; an
/// empty or malformed hash matches nothing). Compares in constant time.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(hash) else { return false };
    let Some((salt, _)) = raw.split_first_chunk::<4>() else { return false };
    if raw.len() != 4 + 32 {
        return false;
    }
    let expected = hash_password_with_salt(*salt, password);
    let (a, b) = (expected.as_bytes(), hash.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_and_verify() {
        let a = hash_password("secret");
        let b = hash_password("secret");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(verify_password(&a, "secret"));
        assert!(verify_password(&b, "secret"));
        assert!(!verify_password(&a, "Secret"));
        assert!(!verify_password("", ""));
        assert!(!verify_password("not base64!", "x"));
    }

    #[test]
    fn rabbitmq_definitions_hashes_verify() {
        // From RabbitMQ's documentation (passwords.md, "Computing a
        // password hash"): salt 908D C60A, password "test12".
        let hash = hash_password_with_salt([0x90, 0x8D, 0xC6, 0x0A], "test12");
        assert_eq!(hash, "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR");
        assert!(verify_password(&hash, "test12"));
    }

    #[test]
    fn permissions_match_unanchored_and_empty_matches_nothing() {
        let m = Matcher::new(&Permission { configure: "^app-".into(), write: "".into(), read: "logs".into() });
        assert!(m.allows(Access::Configure, "app-1"));
        assert!(!m.allows(Access::Configure, "my-app-1"));
        assert!(!m.allows(Access::Write, "anything"));
        assert!(m.allows(Access::Read, "app.logs.today"));
        let all = Matcher::new(&Permission::all());
        assert!(all.allows(Access::Write, ""), "the default exchange is amq.default");
        let only_default = Matcher::new(&Permission { configure: "".into(), write: "^amq\\.default$".into(), read: "".into() });
        assert!(only_default.allows(Access::Write, ""));
    }

    #[test]
    fn commands_check_users_vhosts_and_expressions() {
        let mut auth = Auth::bootstrap(hash_password("guest"));
        assert!(auth.check_password("guest", "guest"));
        let vhosts = |v: &str| v == "/";
        let put = |name: &str, pw: &str| AuthCommand::PutUser {
            name: name.into(),
            password_hash: Some(hash_password(pw)),
            tags: None,
            if_absent: false,
        };
        auth.apply(&put("alice", "pw1"), vhosts).unwrap();
        assert!(auth.check_password("alice", "pw1"));
        // Seeding does not overwrite.
        let seed = AuthCommand::PutUser { name: "alice".into(), password_hash: Some(hash_password("other")), tags: None, if_absent: true };
        auth.apply(&seed, vhosts).unwrap();
        assert!(auth.check_password("alice", "pw1"));
        let set = |vhost: &str, user: &str, re: &str| AuthCommand::SetPermissions {
            vhost: vhost.into(),
            user: user.into(),
            permission: Permission { configure: re.into(), write: re.into(), read: re.into() },
        };
        assert_eq!(auth.apply(&set("/", "bob", ".*"), vhosts), Err(AuthError::NoSuchUser("bob".into())));
        assert_eq!(auth.apply(&set("v2", "alice", ".*"), vhosts), Err(AuthError::NoSuchVhost("v2".into())));
        assert!(matches!(auth.apply(&set("/", "alice", "("), vhosts), Err(AuthError::BadRegex(..))));
        auth.apply(&set("/", "alice", "^a"), vhosts).unwrap();
        assert_eq!(auth.permission("/", "alice").map(|p| p.read.as_str()), Some("^a"));
        auth.apply(&AuthCommand::DeleteUser { name: "alice".into() }, vhosts).unwrap();
        assert!(auth.permission("/", "alice").is_none());
        assert!(!auth.check_password("alice", "pw1"));
        assert_eq!(
            auth.apply(&AuthCommand::DeleteUser { name: "alice".into() }, vhosts),
            Err(AuthError::NoSuchUser("alice".into()))
        );
    }
}
