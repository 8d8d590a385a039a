//! `sluice ctl` commands that go to a gateway's admin HTTP API
//! (`admin.rs`): definitions, users, vhosts, permissions. A small HTTP/1.1
//! client over a TCP connection (one request per connection).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::{CtlCommand, CtlConfig};

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs an admin command; `Ok(false)` if `args.command` is not one.
pub fn run(args: &CtlConfig) -> anyhow::Result<bool> {
    let api = Api::new(args)?;
    let enc = |s: &str| percent_encode(s);
    match &args.command {
        CtlCommand::ListQueues { vhost } => {
            let rows = api.get(&with_vhost("queues", vhost.as_deref()))?;
            print_rows(&rows, &["name", "vhost", "messages_ready", "consumers", "durable"]);
        }
        CtlCommand::ListExchanges { vhost } => {
            let rows = api.get(&with_vhost("exchanges", vhost.as_deref()))?;
            print_rows(&rows, &["name", "vhost", "type", "durable"]);
        }
        CtlCommand::ListBindings { vhost } => {
            let rows = api.get(&with_vhost("bindings", vhost.as_deref()))?;
            print_rows(&rows, &["source", "vhost", "destination", "destination_type", "routing_key"]);
        }
        CtlCommand::DeclareQueue { name, vhost, transient, auto_delete, arguments } => {
            let body = json!({ "durable": !transient, "auto_delete": auto_delete, "arguments": json_arg(arguments.as_deref())? });
            api.send("PUT", &format!("/api/queues/{}/{}", enc(vhost), enc(name)), Some(body))?;
            println!("queue '{name}' declared in vhost '{vhost}'");
        }
        CtlCommand::DeleteQueue { name, vhost } => {
            api.send("DELETE", &format!("/api/queues/{}/{}", enc(vhost), enc(name)), None)?;
            println!("queue '{name}' deleted");
        }
        CtlCommand::PurgeQueue { name, vhost } => {
            api.send("DELETE", &format!("/api/queues/{}/{}/contents", enc(vhost), enc(name)), None)?;
            println!("queue '{name}' purged");
        }
        CtlCommand::DeclareExchange { name, kind, vhost, transient, arguments } => {
            let body = json!({ "type": kind, "durable": !transient, "arguments": json_arg(arguments.as_deref())? });
            api.send("PUT", &format!("/api/exchanges/{}/{}", enc(vhost), enc(name)), Some(body))?;
            println!("exchange '{name}' declared in vhost '{vhost}'");
        }
        CtlCommand::DeleteExchange { name, vhost } => {
            api.send("DELETE", &format!("/api/exchanges/{}/{}", enc(vhost), enc(name)), None)?;
            println!("exchange '{name}' deleted");
        }
        CtlCommand::Bind { source, destination, routing_key, to_exchange, vhost } => {
            let kind = if *to_exchange { "e" } else { "q" };
            let path = format!("/api/bindings/{}/e/{}/{kind}/{}", enc(vhost), enc(source), enc(destination));
            api.send("POST", &path, Some(json!({ "routing_key": routing_key, "arguments": {} })))?;
            println!("bound '{destination}' to '{source}' with key '{routing_key}'");
        }
        CtlCommand::Unbind { source, destination, routing_key, to_exchange, vhost } => {
            let kind = if *to_exchange { "e" } else { "q" };
            let path =
                format!("/api/bindings/{}/e/{}/{kind}/{}/{}", enc(vhost), enc(source), enc(destination), enc(routing_key));
            api.send("DELETE", &path, None)?;
            println!("unbound '{destination}' from '{source}'");
        }
        CtlCommand::ListUsers => {
            let rows = api.get("/api/users")?;
            for r in rows.as_array().into_iter().flatten() {
                let tags: Vec<&str> = r["tags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                println!("{}\t[{}]", r["name"].as_str().unwrap_or_default(), tags.join(", "));
            }
        }
        CtlCommand::AddUser { name, password, tags } => {
            api.send("PUT", &format!("/api/users/{}", enc(name)), Some(json!({ "password": password, "tags": tags })))?;
            println!("user '{name}' set");
        }
        CtlCommand::DeleteUser { name } => {
            api.send("DELETE", &format!("/api/users/{}", enc(name)), None)?;
            println!("user '{name}' deleted");
        }
        CtlCommand::SetUserTags { name, tags } => {
            api.send("PUT", &format!("/api/users/{}", enc(name)), Some(json!({ "tags": tags })))?;
            println!("tags of '{name}' set to [{}]", tags.join(", "));
        }
        CtlCommand::ListVhosts => {
            let rows = api.get("/api/vhosts")?;
            print_rows(&rows, &["name"]);
        }
        CtlCommand::AddVhost { name } => {
            api.send("PUT", &format!("/api/vhosts/{}", enc(name)), None)?;
            println!("vhost '{name}' added");
        }
        CtlCommand::DeleteVhost { name } => {
            api.send("DELETE", &format!("/api/vhosts/{}", enc(name)), None)?;
            println!("vhost '{name}' deleted");
        }
        CtlCommand::ListPermissions => {
            let rows = api.get("/api/permissions")?;
            print_rows(&rows, &["vhost", "user", "configure", "write", "read"]);
        }
        CtlCommand::SetPermissions { user, configure, write, read, vhost } => {
            let body = json!({ "configure": configure, "write": write, "read": read });
            api.send("PUT", &format!("/api/permissions/{}/{}", enc(vhost), enc(user)), Some(body))?;
            println!("permissions of '{user}' in vhost '{vhost}' set");
        }
        CtlCommand::ClearPermissions { user, vhost } => {
            api.send("DELETE", &format!("/api/permissions/{}/{}", enc(vhost), enc(user)), None)?;
            println!("permissions of '{user}' in vhost '{vhost}' cleared");
        }
        CtlCommand::ExportDefinitions { file } => {
            let defs = api.get("/api/definitions")?;
            let text = serde_json::to_string_pretty(&defs)?;
            if file == "-" {
                println!("{text}");
            } else {
                std::fs::write(file, text + "\n").with_context(|| format!("cannot write {file}"))?;
                println!("definitions written to {file}");
            }
        }
        CtlCommand::ImportDefinitions { file } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
            };
            let defs: Value = serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))?;
            api.send("POST", "/api/definitions", Some(defs))?;
            println!("definitions imported from {file}");
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn with_vhost(what: &str, vhost: Option<&str>) -> String {
    match vhost {
        Some(v) => format!("/api/{what}/{}", percent_encode(v)),
        None => format!("/api/{what}"),
    }
}

fn json_arg(text: Option<&str>) -> anyhow::Result<Value> {
    match text {
        None => Ok(json!({})),
        Some(t) => {
            let v: Value = serde_json::from_str(t).with_context(|| format!("--arguments '{t}' is not JSON"))?;
            if !v.is_object() {
                bail!("--arguments must be a JSON object, like '{{\"x-max-length\": 10}}'");
            }
            Ok(v)
        }
    }
}

/// Tab-separated columns, one row per line.
fn print_rows(rows: &Value, columns: &[&str]) {
    for r in rows.as_array().into_iter().flatten() {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| match &r[*c] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The admin API at `--admin`, with basic authentication.
struct Api {
    host: String,
    auth: String,
}

impl Api {
    fn new(args: &CtlConfig) -> anyhow::Result<Api> {
        let host = args
            .admin
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("admin_url (--admin-url) '{}' must be an http:// URL (http://HOST:PORT)", args.admin))?
            .trim_end_matches('/')
            .to_owned();
        if !host.contains(':') {
            bail!("admin_url (--admin-url) '{}' needs a port (http://HOST:PORT)", args.admin);
        }
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", args.user, args.password));
        Ok(Api { host, auth })
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send("GET", path, None)
    }

    /// One request; the JSON answer (`Null` for an empty one), or an error
    /// naming the status and the server's reason.
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut sock = TcpStream::connect(&self.host).with_context(|| format!("cannot reach the admin API at {}", self.host))?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Basic {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.host,
            self.auth,
            payload.len()
        );
        sock.write_all(request.as_bytes())?;
        sock.write_all(payload.as_bytes())?;
        let mut raw = Vec::new();
        sock.read_to_end(&mut raw).with_context(|| format!("reading the answer to {method} {path}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
        let value: Value = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(&body).unwrap_or(Value::String(body.clone())) };
        if !(200..300).contains(&status) {
            let reason = value["reason"].as_str().map(str::to_owned).unwrap_or_else(|| body.trim().to_owned());
            bail!("{method} {path}: HTTP {status}: {reason}");
        }
        Ok(value)
    }
}

/// Joins the chunks of a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
