//! Tests of the metadata state machine: RabbitMQ's rules with their exact
//! texts, what gets stored, routing, determinism and snapshots, plus a
//! property test over random command sequences.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sluice_codecs::command::{Arguments, FieldValue, Properties};

use super::*;

const V: &str = "/";

fn topo() -> Topology {
    Topology::load(Vec::new()).0
}

fn args(pairs: &[(&str, FieldValue)]) -> Arguments {
    pairs.iter().cloned().collect()
}

fn s(v: &str) -> FieldValue {
    FieldValue::LongString(v.as_bytes().to_vec().into())
}

fn exchange(name: &str, kind: &str, durable: bool, auto_delete: bool) -> Command {
    Command::DeclareExchange {
        vhost: V.into(),
        name: name.into(),
        kind: kind.into(),
        passive: false,
        durable,
        auto_delete,
        internal: false,
        arguments: Arguments::default(),
    }
}

/// A queue.declare from connection `conn`, ids 100, 101, ... as needed.
fn queue(name: &str, durable: bool, exclusive: bool, auto_delete: bool, conn: u64, arguments: Arguments) -> Command {
    let n = partition_count(&arguments);
    Command::DeclareQueue {
        vhost: V.into(),
        name: name.into(),
        generated: false,
        passive: false,
        durable,
        conn: Owner(conn),
        exclusive,
        auto_delete,
        arguments,
        new_ids: (100..100 + n as u64).collect(),
    }
}

fn plain_queue(name: &str, durable: bool) -> Command {
    queue(name, durable, false, false, 1, Arguments::default())
}

fn passive_queue(name: &str, conn: u64) -> Command {
    match queue(name, false, false, false, conn, Arguments::default()) {
        Command::DeclareQueue { vhost, name, conn, arguments, new_ids, .. } => Command::DeclareQueue {
            vhost,
            name,
            generated: false,
            passive: true,
            durable: false,
            conn,
            exclusive: false,
            auto_delete: false,
            arguments,
            new_ids,
        },
        other => other,
    }
}

fn bind(source: &str, dest: Dest, key: &str, conn: u64) -> Command {
    Command::Bind {
        vhost: V.into(),
        source: source.into(),
        dest,
        routing_key: key.into(),
        arguments: Arguments::default(),
        conn: Owner(conn),
    }
}

fn unbind(source: &str, dest: Dest, key: &str) -> Command {
    Command::Unbind {
        vhost: V.into(),
        source: source.into(),
        dest,
        routing_key: key.into(),
        arguments: Arguments::default(),
        conn: Owner(1),
    }
}

fn q(name: &str) -> Dest {
    Dest::Queue(name.into())
}
fn x(name: &str) -> Dest {
    Dest::Exchange(name.into())
}

fn delete_queue(name: &str, conn: u64, if_unused: bool, if_empty: bool, counts: (u32, u32)) -> Command {
    Command::DeleteQueue { vhost: V.into(), name: name.into(), if_unused, if_empty, conn: Owner(conn), counts }
}

/// Applies a command that must be accepted.
fn ok(t: &mut Topology, cmd: Command) -> Outcome {
    let what = format!("{cmd:?}");
    t.apply(cmd).unwrap_or_else(|e| panic!("{what} refused: {e}"))
}

fn apply_all(t: &mut Topology, cmds: impl IntoIterator<Item = Command>) {
    for c in cmds {
        let what = format!("{c:?}");
        if let Err(e) = t.apply(c) {
            panic!("{what} refused: {e}");
        }
    }
}

/// Keys of the definitions an outcome puts and deletes.
fn puts(o: &Outcome) -> Vec<Vec<u8>> {
    o.definitions
        .iter()
        .filter_map(|d| match d {
            DefChange::Put { key, .. } => Some(key.clone()),
            DefChange::Delete { .. } => None,
        })
        .collect()
}
fn deletes(o: &Outcome) -> Vec<Vec<u8>> {
    o.definitions
        .iter()
        .filter_map(|d| match d {
            DefChange::Delete { key } => Some(key.clone()),
            DefChange::Put { .. } => None,
        })
        .collect()
}

fn store_apply(store: &mut BTreeMap<Vec<u8>, Vec<u8>>, o: &Outcome) {
    for d in &o.definitions {
        match d {
            DefChange::Put { key, value } => {
                store.insert(key.clone(), value.clone());
            }
            DefChange::Delete { key } => {
                store.remove(key);
            }
        }
    }
}

fn queues_routed(t: &Topology, exchange: &str, key: &str) -> Vec<String> {
    match t.route(V, exchange, key, &Properties::default()) {
        Ok(targets) => targets.iter().map(|t| t.queue.to_string()).collect(),
        Err(e) => panic!("route refused: {e}"),
    }
}

/// The state the error table runs against.
fn fixture() -> Topology {
    let mut t = topo();
    apply_all(
        &mut t,
        [
            plain_queue("q", false),
            queue("excl", false, true, false, 1, Arguments::default()),
            exchange("x", "direct", true, false),
            bind("x", q("q"), "k", 1),
            Command::DeclareExchange {
                vhost: V.into(),
                name: "ix".into(),
                kind: "fanout".into(),
                passive: false,
                durable: false,
                auto_delete: false,
                internal: true,
                arguments: Arguments::default(),
            },
        ],
    );
    t
}

#[test]
fn refusals_have_rabbitmq_codes_and_texts_and_change_nothing() {
    let locked = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'excl' in vhost '/'. It could be \
                  originally declared on another connection or the exclusive property value does not match that of \
                  the original declaration.";
    let default_x = "ACCESS_REFUSED - operation not permitted on the default exchange";
    let mut generated_passive = passive_queue("amq.gen-abc", 1);
    if let Command::DeclareQueue { generated, .. } = &mut generated_passive {
        *generated = true;
    }
    let mut wrong_ids = plain_queue("new", false);
    if let Command::DeclareQueue { new_ids, .. } = &mut wrong_ids {
        new_ids.push(7);
    }
    let cases: Vec<(Command, u16, &str, bool)> = vec![
        (passive_queue("ghost", 1), 404, "NOT_FOUND - no queue 'ghost' in vhost '/'", false),
        (generated_passive, 404, "NOT_FOUND - no queue '' in vhost '/'", false),
        (
            plain_queue("q", true),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'",
            false,
        ),
        (
            queue("q", false, false, true, 1, Arguments::default()),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue 'q' in vhost '/': received 'true' but current is 'false'",
            false,
        ),
        (
            queue("q", false, false, false, 1, args(&[("x-max-length", FieldValue::I32(10))])),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the value '10' but current is none",
            false,
        ),
        (
            queue("bad", false, false, false, 1, args(&[("x-max-length", s("ten"))])),
            406,
            "PRECONDITION_FAILED - invalid arg 'x-max-length' for queue 'bad' in vhost '/': \"expected integer, got longstr\"",
            false,
        ),
        (
            queue("bad", false, false, false, 1, args(&[("x-partitions", FieldValue::I32(0))])),
            406,
            "PRECONDITION_FAILED - invalid arg 'x-partitions' for queue 'bad' in vhost '/': {value_zero,0}",
            false,
        ),
        (
            queue("bad", false, false, false, 1, args(&[("x-partitions", FieldValue::I32(2000))])),
            406,
            "PRECONDITION_FAILED - invalid arg 'x-partitions' for queue 'bad' in vhost '/': {value_too_large,2000,1024}",
            false,
        ),
        (
            queue("bad", false, false, false, 1, args(&[("x-message-ttl", FieldValue::I64(-5))])),
            406,
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'bad' in vhost '/': {value_negative,-5}",
            false,
        ),
        (queue("excl", false, true, false, 2, Arguments::default()), 405, locked, false),
        (passive_queue("excl", 2), 405, locked, false),
        (
            plain_queue("amq.mine", false),
            403,
            "ACCESS_REFUSED - queue 'amq.mine' in vhost '/' uses reserved prefix 'amq.'",
            false,
        ),
        (wrong_ids, 541, "INTERNAL_ERROR - 2 ids given for 1 partitions of queue 'new' in vhost '/'", true),
        (exchange("", "direct", true, false), 403, default_x, false),
        (
            exchange("amq.mine", "direct", true, false),
            403,
            "ACCESS_REFUSED - exchange 'amq.mine' in vhost '/' uses reserved prefix 'amq.'",
            false,
        ),
        (
            exchange("x", "fanout", true, false),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'",
            false,
        ),
        (
            exchange("x", "direct", false, false),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'x' in vhost '/': received 'false' but current is 'true'",
            false,
        ),
        (exchange("y", "bogus", true, false), 503, "COMMAND_INVALID - invalid exchange type 'bogus'", true),
        (
            Command::DeclareExchange {
                vhost: V.into(),
                name: "nope".into(),
                kind: "bogus".into(),
                passive: true,
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: Arguments::default(),
            },
            404,
            "NOT_FOUND - no exchange 'nope' in vhost '/'",
            false,
        ),
        (Command::DeleteExchange { vhost: V.into(), name: "".into(), if_unused: false }, 403, default_x, false),
        (
            Command::DeleteExchange { vhost: V.into(), name: "amq.direct".into(), if_unused: false },
            403,
            "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
            false,
        ),
        (
            Command::DeleteExchange { vhost: V.into(), name: "x".into(), if_unused: true },
            406,
            "PRECONDITION_FAILED - exchange 'x' in vhost '/' in use",
            false,
        ),
        (bind("", q("q"), "k", 1), 403, default_x, false),
        (bind("x", x(""), "k", 1), 403, default_x, false),
        (bind("x", q("ghost"), "k", 1), 404, "NOT_FOUND - no queue 'ghost' in vhost '/'", false),
        (bind("x", x("ghost"), "k", 1), 404, "NOT_FOUND - no exchange 'ghost' in vhost '/'", false),
        (bind("ghost", q("q"), "k", 1), 404, "NOT_FOUND - no exchange 'ghost' in vhost '/'", false),
        (bind("x", q("excl"), "k", 2), 405, locked, false),
        (unbind("ghost", q("q"), "k"), 404, "NOT_FOUND - no exchange 'ghost' in vhost '/'", false),
        (delete_queue("excl", 2, false, false, (0, 0)), 405, locked, false),
        (delete_queue("q", 1, true, false, (0, 1)), 406, "PRECONDITION_FAILED - queue 'q' in vhost '/' in use", false),
        (delete_queue("q", 1, false, true, (3, 0)), 406, "PRECONDITION_FAILED - queue 'q' in vhost '/' not empty", false),
        (
            Command::AddVhost { name: "other".into() },
            0, // not an error: checked below that it is the only success
            "",
            false,
        ),
    ];
    for (cmd, code, text, connection) in cases {
        let mut t = fixture();
        let before = t.clone();
        let what = format!("{cmd:?}");
        match t.apply(cmd) {
            Ok(_) => assert_eq!(code, 0, "{what} was accepted"),
            Err(e) => {
                assert_eq!((e.code, e.text.as_str(), e.connection), (code, text, connection), "{what}");
                assert_eq!(t, before, "{what} was refused but changed the state");
            }
        }
    }
}

#[test]
fn read_side_refusals() {
    let t = fixture();
    let props = Properties::default();
    let err = |r: Result<Vec<Target<'_>>, MetaError>| r.err().map(|e| e.text);
    assert_eq!(err(t.route(V, "nope", "k", &props)), Some("NOT_FOUND - no exchange 'nope' in vhost '/'".into()));
    assert_eq!(
        err(t.route(V, "ix", "k", &props)),
        Some("ACCESS_REFUSED - cannot publish to internal exchange 'ix' in vhost '/'".into())
    );
    assert_eq!(t.queue(V, "ghost", Owner(1)).err().map(|e| e.code), Some(404));
    assert_eq!(t.queue(V, "excl", Owner(2)).err().map(|e| e.code), Some(405));
    assert_eq!(t.queue(V, "excl", Owner(1)).map(|q| q.ids.clone()), Ok(vec![100]));
    // The default exchange routes by queue name; a missing queue is no error.
    assert_eq!(queues_routed(&t, "", "q"), ["q"]);
    assert!(queues_routed(&t, "", "ghost").is_empty());
    assert_eq!(queues_routed(&t, "x", "k"), ["q"]);
    assert!(queues_routed(&t, "x", "other").is_empty());
}

#[test]
fn idempotent_and_missing_things_succeed_quietly() {
    let mut t = fixture();
    let before = t.clone();
    for cmd in [
        plain_queue("q", false),
        passive_queue("q", 7),
        exchange("x", "direct", true, false),
        exchange("amq.direct", "direct", true, false),
        bind("x", q("q"), "k", 1),
        delete_queue("ghost", 1, true, true, (0, 0)),
        Command::DeleteExchange { vhost: V.into(), name: "ghost".into(), if_unused: true },
        unbind("x", q("q"), "other-key"),
        Command::ConsumerGone { vhost: V.into(), name: "q".into(), consumers: 0 },
        Command::AddVhost { name: V.into() },
    ] {
        let what = format!("{cmd:?}");
        assert_eq!(t.apply(cmd), Ok(Outcome::default()), "{what}");
    }
    assert_eq!(t, before);
}

#[test]
fn redeclaring_what_exists_is_answered_without_the_group() {
    let mut t = fixture();
    let ttl = args(&[("x-message-ttl", FieldValue::I64(5))]);
    ok(&mut t, queue("ttl", true, false, false, 1, ttl.clone()));
    // Changes nothing: answered locally.
    for cmd in [
        plain_queue("q", false),
        passive_queue("q", 9),
        queue("excl", false, true, false, 1, Arguments::default()),
        queue("ttl", true, false, false, 3, args(&[("x-message-ttl", FieldValue::I32(5))])),
        exchange("x", "direct", true, false),
        bind("x", q("q"), "k", 1),
    ] {
        assert!(t.changes_nothing(&cmd), "{cmd:?}");
    }
    // Creates, refuses or needs the group: not answered locally.
    for cmd in [
        plain_queue("new", false),
        plain_queue("q", true),
        queue("excl", false, true, false, 8, Arguments::default()),
        passive_queue("excl", 8),
        queue("ttl", true, false, false, 1, args(&[("x-message-ttl", FieldValue::I64(6))])),
        queue("ttl", true, false, false, 1, Arguments::default()),
        Command::DeclareQueue {
            vhost: V.into(),
            name: "".into(),
            generated: true,
            passive: false,
            durable: false,
            conn: Owner(1),
            exclusive: true,
            auto_delete: true,
            arguments: Arguments::default(),
            new_ids: vec![1],
        },
        exchange("x", "fanout", true, false),
        exchange("x", "direct", false, false),
        exchange("new", "direct", true, false),
        bind("x", q("q"), "other-key", 1),
        bind("x", q("ghost"), "k", 1),
        bind("x", q("excl"), "k", 8),
        delete_queue("q", 1, false, false, (0, 0)),
    ] {
        assert!(!t.changes_nothing(&cmd), "{cmd:?}");
    }
}

#[test]
fn auto_delete_exchange_goes_with_its_last_binding() {
    let mut t = topo();
    apply_all(
        &mut t,
        [
            plain_queue("q1", true),
            plain_queue("q2", true),
            exchange("ad", "direct", true, true),
            // No binding yet: nothing to auto-delete.
            unbind("ad", q("q1"), "k"),
            bind("ad", q("q1"), "k", 1),
            bind("ad", q("q2"), "k", 1),
        ],
    );
    let o = ok(&mut t, unbind("ad", q("q1"), "k"));
    assert!(o.exchanges_removed.is_empty());
    let o = ok(&mut t, unbind("ad", q("q2"), "k"));
    assert_eq!(o.exchanges_removed, [(V.to_string(), "ad".to_string())]);
    assert!(deletes(&o).contains(&persist::exchange_key(V, "ad")));
    assert!(t.vhost(V).is_some_and(|vh| !vh.exchanges.contains_key("ad")));

    // Deleting the last destination does it too, and cascades through
    // exchange-to-exchange bindings.
    apply_all(
        &mut t,
        [
            exchange("outer", "fanout", true, true),
            exchange("inner", "fanout", true, true),
            bind("outer", x("inner"), "", 1),
            bind("inner", q("q1"), "", 1),
        ],
    );
    let o = ok(&mut t, delete_queue("q1", 1, false, false, (0, 0)));
    assert_eq!(o.removed, [RemovedQueue { vhost: V.into(), name: "q1".into(), ids: vec![100] }]);
    let mut removed: Vec<&str> = o.exchanges_removed.iter().map(|(_, n)| n.as_str()).collect();
    removed.sort();
    assert_eq!(removed, ["inner", "outer"]);
}

#[test]
fn exchange_cycles_route_each_queue_once_and_terminate() {
    let mut t = topo();
    apply_all(
        &mut t,
        [
            exchange("a", "fanout", false, false),
            exchange("b", "topic", false, false),
            exchange("c", "direct", false, false),
            plain_queue("q", false),
            plain_queue("r", false),
            bind("a", x("b"), "", 1),
            bind("b", x("a"), "#", 1),
            bind("b", x("c"), "#", 1),
            bind("c", x("a"), "k", 1),
            bind("a", x("a"), "", 1),
            bind("b", q("q"), "k", 1),
            bind("c", q("q"), "k", 1),
            bind("a", q("q"), "", 1),
            bind("c", q("r"), "k", 1),
        ],
    );
    let mut got = queues_routed(&t, "a", "k");
    got.sort();
    assert_eq!(got, ["q", "r"]);
    assert_eq!(queues_routed(&t, "c", "other"), Vec::<String>::new());
}

#[test]
fn connection_closed_drops_only_that_connections_exclusive_queues() {
    let mut t = topo();
    apply_all(
        &mut t,
        [
            Command::AddVhost { name: "v2".into() },
            queue("e1", true, true, false, 1, Arguments::default()),
            queue("e2", false, true, false, 2, Arguments::default()),
            plain_queue("shared", true),
            bind("amq.direct", q("e1"), "k", 1),
        ],
    );
    let mut in_v2 = queue("e1b", false, true, false, 1, Arguments::default());
    if let Command::DeclareQueue { vhost, new_ids, .. } = &mut in_v2 {
        *vhost = "v2".into();
        *new_ids = vec![200];
    }
    apply_all(&mut t, [in_v2]);
    let o = ok(&mut t, Command::ConnectionClosed { owner: Owner(1) });
    let removed: Vec<(&str, &str)> = o.removed.iter().map(|r| (r.vhost.as_str(), r.name.as_str())).collect();
    assert_eq!(removed, [("/", "e1"), ("v2", "e1b")]);
    assert!(puts(&o).is_empty());
    assert!(queues_routed(&t, "amq.direct", "k").is_empty());
    let left: Vec<&String> = t.vhost(V).map(|vh| vh.queues.keys().collect()).unwrap_or_default();
    assert_eq!(left, ["e2", "shared"]);
}

#[test]
fn only_durable_things_are_stored() {
    let mut t = topo();
    let put_keys = |t: &mut Topology, cmd: Command| puts(&ok(t, cmd));
    assert!(put_keys(&mut t, exchange("tx", "direct", false, false)).is_empty());
    assert_eq!(put_keys(&mut t, exchange("dx", "direct", true, false)), [persist::exchange_key(V, "dx")]);
    assert!(put_keys(&mut t, plain_queue("tq", false)).is_empty());
    assert_eq!(put_keys(&mut t, plain_queue("dq", true)), [persist::queue_key(V, "dq")]);

    // Durable but exclusive: never recovered, so never stored, and its
    // storage is not durable either.
    let o = ok(&mut t, queue("xq", true, true, false, 1, Arguments::default()));
    assert!(puts(&o).is_empty());
    assert!(o.created.iter().all(|c| !c.durable));
    assert!(t.queue(V, "xq", Owner(1)).is_ok_and(|q| q.durable && !q.persisted));

    // A binding is stored only between two durable ends.
    for (source, dest, stored) in [
        ("dx", q("dq"), true),
        ("dx", q("tq"), false),
        ("tx", q("dq"), false),
        ("dx", q("xq"), false),
        ("dx", x("tx"), false),
        ("tx", x("dx"), false),
        ("amq.topic", x("dx"), true),
    ] {
        let keys = put_keys(&mut t, bind(source, dest.clone(), "k", 1));
        assert_eq!(!keys.is_empty(), stored, "{source} -> {dest:?}");
    }
    let mut store = BTreeMap::new();
    let mut replay = topo();
    for cmd in script() {
        if let Ok(o) = replay.apply(cmd) {
            store_apply(&mut store, &o);
        }
    }
    assert_eq!(store, replay.definitions());
}

#[test]
fn consumer_gone_deletes_only_unused_auto_delete_queues() {
    let mut t = topo();
    apply_all(
        &mut t,
        [queue("ad", true, false, true, 1, Arguments::default()), plain_queue("keep", true)],
    );
    let gone = |name: &str, consumers| Command::ConsumerGone { vhost: V.into(), name: name.into(), consumers };
    assert_eq!(t.apply(gone("ad", 1)), Ok(Outcome::default()));
    assert_eq!(t.apply(gone("keep", 0)), Ok(Outcome::default()));
    assert_eq!(t.apply(gone("ghost", 0)), Ok(Outcome::default()));
    let o = ok(&mut t, gone("ad", 0));
    assert_eq!(o.removed.len(), 1);
    assert_eq!(deletes(&o), [persist::queue_key(V, "ad")]);
}

#[test]
fn partitions_by_header_else_routing_key() {
    // FNV-1a 64 reference values: the choice of partition must never change.
    assert_eq!(partition_hash(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(partition_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    let mut t = topo();
    let mut cmd = queue("p", true, false, false, 1, args(&[("x-partitions", FieldValue::I16(4))]));
    if let Command::DeclareQueue { new_ids, .. } = &mut cmd {
        *new_ids = vec![10, 11, 12, 13];
    }
    let o = ok(&mut t, cmd);
    assert_eq!(o.created.first().map(|c| c.ids.clone()), Some(vec![10, 11, 12, 13]));
    // Through the default exchange the routing key is the queue's name,
    // "p": the hash input unless the message has an `x-partition-key`.
    let route = |header: Option<FieldValue>| {
        let props = Properties { headers: header.map(|h| args(&[("x-partition-key", h)])), ..Default::default() };
        t.route(V, "", "p", &props).ok().and_then(|r| r.first().map(|t| (t.partition, t.id)))
    };
    let want = |key: &[u8]| (partition_hash(key) % 4) as usize;
    assert_eq!(route(None), Some((want(b"p"), 10 + want(b"p") as u64)));
    assert_eq!(route(Some(s("user-7"))).map(|r| r.0), Some(want(b"user-7")));
    assert_eq!(route(Some(FieldValue::I32(42))).map(|r| r.0), Some(want(b"42")));
    // Through a direct exchange the routing key is the hash input.
    apply_all(&mut t, [bind("amq.direct", q("p"), "order.1", 1)]);
    let targets = t.route(V, "amq.direct", "order.1", &Properties::default()).unwrap_or_default();
    assert_eq!(targets.iter().map(|t| t.partition).collect::<Vec<_>>(), [want(b"order.1")]);
}

/// Commands of every kind, some refused.
fn script() -> Vec<Command> {
    let mut v = vec![
        Command::AddVhost { name: "v2".into() },
        exchange("dx", "topic", true, false),
        exchange("tx", "fanout", false, true),
        exchange("dx", "direct", true, false),
        plain_queue("dq", true),
        plain_queue("tq", false),
        queue("xq", true, true, false, 1, Arguments::default()),
        queue("ad", true, false, true, 2, args(&[("x-max-length", FieldValue::I64(5))])),
        queue("parts", true, false, false, 1, args(&[("x-partitions", FieldValue::I8(3))])),
        bind("dx", q("dq"), "a.*", 1),
        bind("dx", q("parts"), "#", 1),
        bind("dx", x("tx"), "b.#", 1),
        bind("tx", q("tq"), "", 1),
        bind("amq.fanout", q("ad"), "", 1),
        bind("dx", q("xq"), "x", 2),
        bind("dx", q("xq"), "x", 1),
        unbind("tx", q("tq"), ""),
        Command::ConsumerGone { vhost: V.into(), name: "ad".into(), consumers: 0 },
        delete_queue("dq", 1, true, false, (0, 2)),
        delete_queue("dq", 1, false, false, (4, 2)),
        Command::DeleteExchange { vhost: V.into(), name: "amq.topic".into(), if_unused: false },
        Command::ConnectionClosed { owner: Owner(1) },
    ];
    v.push(plain_queue("dq", true));
    v.push(bind("dx", q("dq"), "again", 1));
    v
}

#[test]
fn same_commands_same_outcomes_and_definitions() {
    let (mut a, mut b) = (topo(), topo());
    let (mut store_a, mut store_b) = (BTreeMap::new(), BTreeMap::new());
    for cmd in script() {
        let (oa, ob) = (a.apply(cmd.clone()), b.apply(cmd));
        assert_eq!(oa, ob);
        if let (Ok(oa), Ok(ob)) = (&oa, &ob) {
            store_apply(&mut store_a, oa);
            store_apply(&mut store_b, ob);
        }
    }
    assert_eq!(a, b);
    assert_eq!(store_a, store_b);
    assert_eq!(store_a, a.definitions());
    assert!(!store_a.is_empty());
}

#[test]
fn load_rebuilds_the_durable_part() {
    let mut t = topo();
    let mut store = BTreeMap::new();
    for cmd in script() {
        if let Ok(o) = t.apply(cmd) {
            store_apply(&mut store, &o);
        }
    }
    let (loaded, skipped) = Topology::load(store.clone().into_iter().chain([(b"q?".to_vec(), b"junk".to_vec())]));
    assert_eq!(skipped.len(), 1);
    assert_eq!(loaded.definitions(), store);
    // Recovered queues are durable, not exclusive, with their ids.
    let parts = loaded.queue(V, "parts", Owner(9)).map(|q| (q.ids.len(), q.persisted, q.exclusive_owner));
    assert_eq!(parts, Ok((3, true, None)));
    assert!(loaded.queue(V, "xq", Owner(2)).is_err());
    // The routes between durable things survive.
    assert_eq!(queues_routed(&loaded, "dx", "a.b"), queues_routed(&t, "dx", "a.b"));
}

#[test]
fn snapshots_round_trip() {
    let mut t = topo();
    for cmd in script() {
        let _ = t.apply(cmd);
    }
    let bytes = postcard::to_stdvec(&t).unwrap_or_default();
    let back: Result<Topology, _> = postcard::from_bytes(&bytes);
    assert_eq!(back.ok(), Some(t));
    for cmd in script() {
        let bytes = postcard::to_stdvec(&cmd).unwrap_or_default();
        let back: Result<Command, _> = postcard::from_bytes(&bytes);
        assert_eq!(back.ok(), Some(cmd));
    }
}

// ---- property test -------------------------------------------------------

fn arb_args() -> impl Strategy<Value = Arguments> {
    prop_oneof![
        Just(Arguments::default()),
        Just(args(&[("x-max-length", FieldValue::I32(5))])),
        Just(args(&[("x-max-length", FieldValue::I64(5))])),
        Just(args(&[("x-partitions", FieldValue::I32(2))])),
        Just(args(&[("x-max-length", s("five"))])),
        Just(args(&[("x-match", s("any")), ("h", FieldValue::I32(1))])),
    ]
}

fn arb_command() -> impl Strategy<Value = Command> {
    let vhost = prop_oneof![Just("/"), Just("v2"), Just("v3")].prop_map(String::from);
    let xname = prop_oneof![Just("a"), Just("b"), Just("c"), Just(""), Just("amq.direct"), Just("amq.x")].prop_map(String::from);
    let qname = prop_oneof![Just("q1"), Just("q2"), Just("q3"), Just("amq.gen-1")].prop_map(String::from);
    let dest = prop_oneof![qname.clone().prop_map(Dest::Queue), xname.clone().prop_map(Dest::Exchange)];
    let kind = prop_oneof![Just("direct"), Just("fanout"), Just("topic"), Just("headers"), Just("nope")].prop_map(String::from);
    let key = prop_oneof![Just("k"), Just("a.b"), Just("#"), Just("")].prop_map(String::from);
    let owner = (1u64..4).prop_map(Owner);
    let flags = any::<[bool; 4]>();
    prop_oneof![
        vhost.clone().prop_map(|name| Command::AddVhost { name }),
        (vhost.clone(), xname.clone(), kind, flags, arb_args()).prop_map(|(vhost, name, kind, f, arguments)| {
            Command::DeclareExchange {
                vhost,
                name,
                kind,
                passive: f[0] && f[1],
                durable: f[1],
                auto_delete: f[2],
                internal: f[3] && !f[0],
                arguments,
            }
        }),
        (vhost.clone(), xname.clone(), any::<bool>())
            .prop_map(|(vhost, name, if_unused)| Command::DeleteExchange { vhost, name, if_unused }),
        (vhost.clone(), xname.clone(), dest.clone(), key.clone(), arb_args(), owner.clone(), any::<bool>()).prop_map(
            |(vhost, source, dest, routing_key, arguments, conn, bind)| match bind {
                true => Command::Bind { vhost, source, dest, routing_key, arguments, conn },
                false => Command::Unbind { vhost, source, dest, routing_key, arguments, conn },
            }
        ),
        (vhost.clone(), qname.clone(), flags, owner.clone(), arb_args(), any::<bool>()).prop_map(
            |(vhost, name, f, conn, arguments, generated)| Command::DeclareQueue {
                vhost,
                name,
                generated: generated && !f[0],
                passive: f[0] && f[1],
                durable: f[1],
                conn,
                exclusive: f[2],
                auto_delete: f[3],
                arguments,
                // Filled in by the test with fresh ids.
                new_ids: Vec::new(),
            }
        ),
        (vhost.clone(), qname.clone(), any::<[bool; 2]>(), owner.clone(), 0u32..2, 0u32..2).prop_map(
            |(vhost, name, f, conn, m, c)| Command::DeleteQueue {
                vhost,
                name,
                if_unused: f[0],
                if_empty: f[1],
                conn,
                counts: (m, c)
            }
        ),
        (vhost, qname, 0u32..2).prop_map(|(vhost, name, consumers)| Command::ConsumerGone { vhost, name, consumers }),
        owner.prop_map(|owner| Command::ConnectionClosed { owner }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// On random command sequences: refused commands change nothing, two
    /// replicas agree, the definitions written match the state, and loading
    /// them back or restoring a snapshot gives the same durable state.
    #[test]
    fn replicas_agree_and_definitions_track_the_state(cmds in prop::collection::vec(arb_command(), 1..60)) {
        let (mut a, mut b) = (topo(), topo());
        let mut store = BTreeMap::new();
        let mut next_id = 1u64;
        for mut cmd in cmds {
            if let Command::DeclareQueue { arguments, new_ids, .. } = &mut cmd {
                let n = partition_count(arguments) as u64;
                *new_ids = (next_id..next_id + n).collect();
                next_id += n;
            }
            let before = a.clone();
            let local = a.changes_nothing(&cmd);
            let (oa, ob) = (a.apply(cmd.clone()), b.apply(cmd));
            prop_assert_eq!(&oa, &ob);
            if local {
                // What a gateway answers from its copy is what the group
                // would have answered, and changes nothing.
                prop_assert_eq!(&oa, &Ok(Outcome::default()));
                prop_assert_eq!(&a, &before);
            }
            match oa {
                Ok(o) => store_apply(&mut store, &o),
                Err(_) => prop_assert_eq!(&a, &before),
            }
            prop_assert_eq!(&store, &a.definitions());
        }
        prop_assert_eq!(&a, &b);
        let (loaded, skipped) = Topology::load(store.clone());
        prop_assert!(skipped.is_empty());
        prop_assert_eq!(loaded.definitions(), store);
        let bytes = postcard::to_stdvec(&a).unwrap_or_default();
        let restored: Result<Topology, _> = postcard::from_bytes(&bytes);
        prop_assert_eq!(restored.ok(), Some(a));
    }
}
