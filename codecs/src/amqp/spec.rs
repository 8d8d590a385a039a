//! The AMQP 0-9-1 method table (classes connection, channel, exchange, queue,
//! basic, confirm and tx, with RabbitMQ's extensions), generated from a single
//! declarative list.
//!
//! Each entry of the `methods!` invocation below names a method and its
//! argument fields once; the macro generates the argument struct, the
//! [`Method`] variant, ids/names, the decoder, the encoder, the exact encoded
//! length and (in tests) a proptest strategy. Adding a method to the list is
//! all it takes for the round-trip tests to cover it.
//!
//! Argument types are the spec's domains: `octet` u8, `short` u16, `long` u32,
//! `longlong` u64, `bit` bool, `shortstr` String, `longstr` Bytes,
//! `timestamp` u64, `table` FieldTable. Consecutive `bit` fields share octets
//! (least significant bit first); any other field ends the run.
//!
//! Encoding a `shortstr` longer than 255 bytes truncates it at the last UTF-8
//! character boundary that fits, so encoders stay infallible and never emit a
//! corrupt frame. Decoding an invalid-UTF-8 `shortstr` is an error.

use bytes::{BufMut, Bytes, BytesMut};
use nom::Parser;

use super::error::DecodeError;
use super::value::FieldTable;
use super::wire::{
    self, finish, longstr_len, put_longstr, put_shortstr, run, shortstr_len, WireError,
};

/// AMQP reply codes (the `reply_code` of `connection.close`,
/// `channel.close` and `basic.return`).
pub mod reply_code {
    /// Success (used in normal `close`).
    pub const REPLY_SUCCESS: u16 = 200;
    /// Message too large (soft, channel).
    pub const CONTENT_TOO_LARGE: u16 = 311;
    /// Mandatory message could not be routed (`basic.return`).
    pub const NO_ROUTE: u16 = 312;
    /// Immediate message had no consumers (`basic.return`).
    pub const NO_CONSUMERS: u16 = 313;
    /// Operator forced the connection closed.
    pub const CONNECTION_FORCED: u16 = 320;
    /// Unknown or forbidden virtual host.
    pub const INVALID_PATH: u16 = 402;
    /// Access denied (channel).
    pub const ACCESS_REFUSED: u16 = 403;
    /// Entity does not exist (channel).
    pub const NOT_FOUND: u16 = 404;
    /// Entity is exclusively used by another connection (channel).
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Precondition failed, e.g. redeclare with other arguments (channel).
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Malformed frame (connection).
    pub const FRAME_ERROR: u16 = 501;
    /// Illegal field values (connection).
    pub const SYNTAX_ERROR: u16 = 502;
    /// Invalid method sequence (connection).
    pub const COMMAND_INVALID: u16 = 503;
    /// Bad channel number / channel state (connection).
    pub const CHANNEL_ERROR: u16 = 504;
    /// Frame of the wrong type for the current state (connection).
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Server out of resources (connection).
    pub const RESOURCE_ERROR: u16 = 506;
    /// Not allowed by server policy (connection).
    pub const NOT_ALLOWED: u16 = 530;
    /// Functionality not implemented (connection).
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// Internal server error (connection).
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Class ids.
pub mod class {
    /// `connection` class.
    pub const CONNECTION: u16 = 10;
    /// `channel` class.
    pub const CHANNEL: u16 = 20;
    /// `exchange` class.
    pub const EXCHANGE: u16 = 40;
    /// `queue` class.
    pub const QUEUE: u16 = 50;
    /// `basic` class (the only content class).
    pub const BASIC: u16 = 60;
    /// `confirm` class (RabbitMQ extension).
    pub const CONFIRM: u16 = 85;
    /// `tx` class.
    pub const TX: u16 = 90;
}

/// Writes method arguments, packing runs of bits into octets.
struct ArgWriter<'a> {
    out: &'a mut BytesMut,
    /// The octet being filled with bits.
    bits: u8,
    /// How many bits of `bits` are used (0 = no pending octet).
    nbits: u8,
}

impl<'a> ArgWriter<'a> {
    fn new(out: &'a mut BytesMut) -> Self {
        ArgWriter {
            out,
            bits: 0,
            nbits: 0,
        }
    }

    /// Emits the pending bit octet, if any. Called before every non-bit field
    /// (which ends a packing run) and at the end.
    fn flush(&mut self) {
        if self.nbits > 0 {
            self.out.put_u8(self.bits);
            self.bits = 0;
            self.nbits = 0;
        }
    }

    fn bit(&mut self, v: &bool) {
        if self.nbits == 8 {
            self.flush();
        }
        if *v {
            self.bits |= 1 << self.nbits;
        }
        self.nbits += 1;
    }

    fn octet(&mut self, v: &u8) {
        self.flush();
        self.out.put_u8(*v);
    }

    fn short(&mut self, v: &u16) {
        self.flush();
        self.out.put_u16(*v);
    }

    fn long(&mut self, v: &u32) {
        self.flush();
        self.out.put_u32(*v);
    }

    fn longlong(&mut self, v: &u64) {
        self.flush();
        self.out.put_u64(*v);
    }

    // No 0-9-1 method has a `timestamp` argument; kept so the table can use
    // the domain.
    #[allow(dead_code)]
    fn timestamp(&mut self, v: &u64) {
        self.longlong(v);
    }

    fn shortstr(&mut self, v: &str) {
        self.flush();
        put_shortstr(self.out, v);
    }

    fn longstr(&mut self, v: &Bytes) {
        self.flush();
        put_longstr(self.out, v);
    }

    fn table(&mut self, v: &FieldTable) {
        self.flush();
        v.encode(self.out);
    }
}

/// Computes the encoded size of method arguments with the same bit-packing
/// rules as [`ArgWriter`].
#[derive(Default)]
struct ArgSizer {
    len: usize,
    /// Bits used in the current bit octet (0 = none open).
    nbits: u8,
}

impl ArgSizer {
    fn bit(&mut self, _: &bool) {
        if self.nbits == 0 || self.nbits == 8 {
            self.len += 1;
            self.nbits = 0;
        }
        self.nbits += 1;
    }

    fn fixed(&mut self, n: usize) {
        self.nbits = 0;
        self.len += n;
    }

    fn octet(&mut self, _: &u8) {
        self.fixed(1);
    }

    fn short(&mut self, _: &u16) {
        self.fixed(2);
    }

    fn long(&mut self, _: &u32) {
        self.fixed(4);
    }

    fn longlong(&mut self, _: &u64) {
        self.fixed(8);
    }

    // No 0-9-1 method has a `timestamp` argument; kept so the table can use
    // the domain.
    #[allow(dead_code)]
    fn timestamp(&mut self, _: &u64) {
        self.fixed(8);
    }

    fn shortstr(&mut self, v: &str) {
        self.fixed(shortstr_len(v));
    }

    fn longstr(&mut self, v: &Bytes) {
        self.fixed(longstr_len(v));
    }

    fn table(&mut self, v: &FieldTable) {
        self.fixed(v.encoded_len());
    }
}

/// Reads method arguments, unpacking runs of bits. Each field is parsed by
/// a wire parser labelled with the method name.
struct ArgReader<'a> {
    /// The arguments not read yet.
    input: &'a [u8],
    /// The current bit octet.
    bits: u8,
    /// Index of the next bit to read from `bits`; 8 = read a new octet.
    pos: u8,
    context: &'static str,
}

impl<'a> ArgReader<'a> {
    fn new(args: &'a [u8], context: &'static str) -> Self {
        ArgReader {
            input: args,
            bits: 0,
            pos: 8,
            context,
        }
    }

    /// Runs `parser` on the remaining arguments and advances past what it
    /// consumed.
    fn run<T>(
        &mut self,
        parser: impl Parser<&'a [u8], Output = T, Error = WireError>,
    ) -> Result<T, DecodeError> {
        let (rest, value) = run(self.context, parser, self.input)?;
        self.input = rest;
        Ok(value)
    }

    /// Parses a non-bit field, which ends a bit run: the next `bit()` starts
    /// a fresh octet.
    fn field<T>(
        &mut self,
        parser: impl Parser<&'a [u8], Output = T, Error = WireError>,
    ) -> Result<T, DecodeError> {
        self.pos = 8;
        self.run(parser)
    }

    fn bit(&mut self) -> Result<bool, DecodeError> {
        if self.pos == 8 {
            self.bits = self.run(wire::u8(self.context))?;
            self.pos = 0;
        }
        let v = self.bits & (1 << self.pos) != 0;
        self.pos += 1;
        Ok(v)
    }

    fn octet(&mut self) -> Result<u8, DecodeError> {
        self.field(wire::u8(self.context))
    }

    fn short(&mut self) -> Result<u16, DecodeError> {
        self.field(wire::u16(self.context))
    }

    fn long(&mut self) -> Result<u32, DecodeError> {
        self.field(wire::u32(self.context))
    }

    fn longlong(&mut self) -> Result<u64, DecodeError> {
        self.field(wire::u64(self.context))
    }

    // No 0-9-1 method has a `timestamp` argument; kept so the table can use
    // the domain.
    #[allow(dead_code)]
    fn timestamp(&mut self) -> Result<u64, DecodeError> {
        self.longlong()
    }

    fn shortstr(&mut self) -> Result<String, DecodeError> {
        self.field(wire::shortstr(self.context))
    }

    fn longstr(&mut self) -> Result<Bytes, DecodeError> {
        self.field(wire::longstr(self.context))
    }

    fn table(&mut self) -> Result<FieldTable, DecodeError> {
        self.field(|i| FieldTable::parse(i, 0))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        run(self.context, finish(self.context), self.input).map(|_| ())
    }
}

/// Rust type of an argument domain.
#[rustfmt::skip]
macro_rules! field_type {
    (octet) => { u8 };
    (short) => { u16 };
    (long) => { u32 };
    (longlong) => { u64 };
    (bit) => { bool };
    (shortstr) => { String };
    (longstr) => { Bytes };
    (timestamp) => { u64 };
    (table) => { FieldTable };
}

/// `true` if the method entry carries the `content` marker.
#[rustfmt::skip]
macro_rules! has_content {
    () => { false };
    (content) => { true };
}

/// Generates everything method-related from the method list; see the module
/// docs.
macro_rules! methods {
    ($(
        $(#[$doc:meta])*
        $variant:ident = ($class:literal, $method:literal, $name:literal $(, $content:ident)?) {
            $( $(#[$fdoc:meta])* $field:ident : $ty:ident ),* $(,)?
        }
    )*) => {
        $(
            #[doc = concat!("Arguments of `", $name, "` (class ", stringify!($class),
                            ", method ", stringify!($method), ").")]
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct $variant {
                $( $(#[$fdoc])* pub $field: field_type!($ty), )*
            }

            impl $variant {
                /// Class id of this method.
                pub const CLASS_ID: u16 = $class;
                /// Method id of this method.
                pub const METHOD_ID: u16 = $method;
                /// Spec name, e.g. `basic.publish`.
                pub const NAME: &'static str = $name;

                #[allow(unused_variables)]
                fn encode_args(&self, w: &mut ArgWriter<'_>) {
                    $( w.$ty(&self.$field); )*
                }

                #[allow(unused_variables)]
                fn size_args(&self, s: &mut ArgSizer) {
                    $( s.$ty(&self.$field); )*
                }

                #[allow(unused_variables)]
                fn decode_args(r: &mut ArgReader<'_>) -> Result<Self, DecodeError> {
                    // Struct expression fields are evaluated in source order,
                    // which is wire order.
                    Ok($variant { $( $field: r.$ty()?, )* })
                }
            }

            impl From<$variant> for Method {
                fn from(m: $variant) -> Method {
                    Method::$variant(m)
                }
            }
        )*

        /// Any AMQP 0-9-1 method with its arguments.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant($variant),
            )*
        }

        /// `(class_id, method_id, name)` of every known method, in table order.
        pub const ALL_METHODS: &[(u16, u16, &str)] = &[ $( ($class, $method, $name), )* ];

        impl Method {
            /// The class id.
            pub fn class_id(&self) -> u16 {
                match self { $( Method::$variant(_) => $class, )* }
            }

            /// The method id within the class.
            pub fn method_id(&self) -> u16 {
                match self { $( Method::$variant(_) => $method, )* }
            }

            /// The spec name, e.g. `"basic.publish"`.
            pub fn name(&self) -> &'static str {
                match self { $( Method::$variant(_) => $name, )* }
            }

            /// True if the method is followed by a content header and body
            /// (`basic.publish`, `basic.return`, `basic.deliver`, `basic.get-ok`).
            pub fn has_content(&self) -> bool {
                match self { $( Method::$variant(_) => has_content!($($content)?), )* }
            }

            /// Decodes the arguments `args` of method `class_id.method_id`.
            /// The arguments must be consumed exactly.
            pub fn decode(class_id: u16, method_id: u16, args: &[u8]) -> Result<Method, DecodeError> {
                match (class_id, method_id) {
                    $(
                        ($class, $method) => {
                            let mut r = ArgReader::new(args, $name);
                            let m = $variant::decode_args(&mut r)?;
                            r.finish()?;
                            Ok(Method::$variant(m))
                        }
                    )*
                    _ if ALL_METHODS.iter().any(|&(c, _, _)| c == class_id) => {
                        Err(DecodeError::UnknownMethod { class_id, method_id })
                    }
                    _ => Err(DecodeError::UnknownClass(class_id)),
                }
            }

            /// Writes class id, method id and arguments (a method frame payload).
            pub fn encode(&self, out: &mut BytesMut) {
                out.reserve(self.encoded_len());
                self.write(out);
            }

            /// [`Method::encode`] without the reservation, for callers that
            /// already reserved room for a whole frame.
            pub(crate) fn write(&self, out: &mut BytesMut) {
                out.put_u16(self.class_id());
                out.put_u16(self.method_id());
                let mut w = ArgWriter::new(out);
                match self { $( Method::$variant(m) => m.encode_args(&mut w), )* }
                w.flush();
            }

            /// Exact number of bytes [`Method::encode`] writes.
            pub fn encoded_len(&self) -> usize {
                let mut s = ArgSizer::default();
                match self { $( Method::$variant(m) => m.size_args(&mut s), )* }
                4 + s.len
            }
        }

        /// Proptest strategy producing every method with arbitrary arguments.
        #[cfg(test)]
        pub(crate) fn arb_method() -> proptest::strategy::BoxedStrategy<Method> {
            use proptest::prelude::*;
            use crate::amqp::arb::field;
            proptest::strategy::Union::new(vec![
                $({
                    let s = Just($variant::default()).boxed();
                    $(
                        let s = (s, field::$ty())
                            .prop_map(|(mut m, v)| { m.$field = v; m })
                            .boxed();
                    )*
                    s.prop_map(Method::$variant).boxed()
                },)*
            ])
            .boxed()
        }
    };
}

methods! {
    // ---- connection (10) ----
    ConnectionStart = (10, 10, "connection.start") {
        version_major: octet,
        version_minor: octet,
        server_properties: table,
        mechanisms: longstr,
        locales: longstr,
    }
    ConnectionStartOk = (10, 11, "connection.start-ok") {
        client_properties: table,
        mechanism: shortstr,
        response: longstr,
        locale: shortstr,
    }
    ConnectionSecure = (10, 20, "connection.secure") {
        challenge: longstr,
    }
    ConnectionSecureOk = (10, 21, "connection.secure-ok") {
        response: longstr,
    }
    ConnectionTune = (10, 30, "connection.tune") {
        channel_max: short,
        frame_max: long,
        heartbeat: short,
    }
    ConnectionTuneOk = (10, 31, "connection.tune-ok") {
        channel_max: short,
        frame_max: long,
        heartbeat: short,
    }
    ConnectionOpen = (10, 40, "connection.open") {
        virtual_host: shortstr,
        /// Reserved (was `capabilities`); clients send "".
        capabilities: shortstr,
        /// Reserved (was `insist`).
        insist: bit,
    }
    ConnectionOpenOk = (10, 41, "connection.open-ok") {
        /// Reserved (was `known-hosts`); servers send "".
        known_hosts: shortstr,
    }
    ConnectionClose = (10, 50, "connection.close") {
        reply_code: short,
        reply_text: shortstr,
        /// Class of the method that caused the close (0 if none).
        class_id: short,
        /// Method that caused the close (0 if none).
        method_id: short,
    }
    ConnectionCloseOk = (10, 51, "connection.close-ok") {}
    /// RabbitMQ extension: the server blocks publishing connections.
    ConnectionBlocked = (10, 60, "connection.blocked") {
        reason: shortstr,
    }
    /// RabbitMQ extension.
    ConnectionUnblocked = (10, 61, "connection.unblocked") {}
    /// RabbitMQ extension: refresh credentials (e.g. an OAuth token).
    ConnectionUpdateSecret = (10, 70, "connection.update-secret") {
        new_secret: longstr,
        reason: shortstr,
    }
    /// RabbitMQ extension.
    ConnectionUpdateSecretOk = (10, 71, "connection.update-secret-ok") {}

    // ---- channel (20) ----
    ChannelOpen = (20, 10, "channel.open") {
        /// Reserved (was `out-of-band`).
        reserved_1: shortstr,
    }
    ChannelOpenOk = (20, 11, "channel.open-ok") {
        /// Reserved (was `channel-id`).
        reserved_1: longstr,
    }
    ChannelFlow = (20, 20, "channel.flow") {
        active: bit,
    }
    ChannelFlowOk = (20, 21, "channel.flow-ok") {
        active: bit,
    }
    ChannelClose = (20, 40, "channel.close") {
        reply_code: short,
        reply_text: shortstr,
        class_id: short,
        method_id: short,
    }
    ChannelCloseOk = (20, 41, "channel.close-ok") {}

    // ---- exchange (40) ----
    ExchangeDeclare = (40, 10, "exchange.declare") {
        /// Reserved (access ticket), always 0.
        ticket: short,
        exchange: shortstr,
        /// Exchange type (`direct`, `fanout`, `topic`, `headers`, …).
        kind: shortstr,
        passive: bit,
        durable: bit,
        auto_delete: bit,
        internal: bit,
        nowait: bit,
        arguments: table,
    }
    ExchangeDeclareOk = (40, 11, "exchange.declare-ok") {}
    ExchangeDelete = (40, 20, "exchange.delete") {
        ticket: short,
        exchange: shortstr,
        if_unused: bit,
        nowait: bit,
    }
    ExchangeDeleteOk = (40, 21, "exchange.delete-ok") {}
    /// RabbitMQ extension: exchange-to-exchange binding.
    ExchangeBind = (40, 30, "exchange.bind") {
        ticket: short,
        destination: shortstr,
        source: shortstr,
        routing_key: shortstr,
        nowait: bit,
        arguments: table,
    }
    ExchangeBindOk = (40, 31, "exchange.bind-ok") {}
    /// RabbitMQ extension.
    ExchangeUnbind = (40, 40, "exchange.unbind") {
        ticket: short,
        destination: shortstr,
        source: shortstr,
        routing_key: shortstr,
        nowait: bit,
        arguments: table,
    }
    /// Note the method id: 51, not 41 (as in RabbitMQ's spec file).
    ExchangeUnbindOk = (40, 51, "exchange.unbind-ok") {}

    // ---- queue (50) ----
    QueueDeclare = (50, 10, "queue.declare") {
        ticket: short,
        queue: shortstr,
        passive: bit,
        durable: bit,
        exclusive: bit,
        auto_delete: bit,
        nowait: bit,
        arguments: table,
    }
    QueueDeclareOk = (50, 11, "queue.declare-ok") {
        queue: shortstr,
        message_count: long,
        consumer_count: long,
    }
    QueueBind = (50, 20, "queue.bind") {
        ticket: short,
        queue: shortstr,
        exchange: shortstr,
        routing_key: shortstr,
        nowait: bit,
        arguments: table,
    }
    QueueBindOk = (50, 21, "queue.bind-ok") {}
    QueuePurge = (50, 30, "queue.purge") {
        ticket: short,
        queue: shortstr,
        nowait: bit,
    }
    QueuePurgeOk = (50, 31, "queue.purge-ok") {
        message_count: long,
    }
    QueueDelete = (50, 40, "queue.delete") {
        ticket: short,
        queue: shortstr,
        if_unused: bit,
        if_empty: bit,
        nowait: bit,
    }
    QueueDeleteOk = (50, 41, "queue.delete-ok") {
        message_count: long,
    }
    QueueUnbind = (50, 50, "queue.unbind") {
        ticket: short,
        queue: shortstr,
        exchange: shortstr,
        routing_key: shortstr,
        arguments: table,
    }
    QueueUnbindOk = (50, 51, "queue.unbind-ok") {}

    // ---- basic (60) ----
    BasicQos = (60, 10, "basic.qos") {
        prefetch_size: long,
        prefetch_count: short,
        global: bit,
    }
    BasicQosOk = (60, 11, "basic.qos-ok") {}
    BasicConsume = (60, 20, "basic.consume") {
        ticket: short,
        queue: shortstr,
        consumer_tag: shortstr,
        no_local: bit,
        no_ack: bit,
        exclusive: bit,
        nowait: bit,
        arguments: table,
    }
    BasicConsumeOk = (60, 21, "basic.consume-ok") {
        consumer_tag: shortstr,
    }
    BasicCancel = (60, 30, "basic.cancel") {
        consumer_tag: shortstr,
        nowait: bit,
    }
    BasicCancelOk = (60, 31, "basic.cancel-ok") {
        consumer_tag: shortstr,
    }
    BasicPublish = (60, 40, "basic.publish", content) {
        ticket: short,
        exchange: shortstr,
        routing_key: shortstr,
        mandatory: bit,
        immediate: bit,
    }
    BasicReturn = (60, 50, "basic.return", content) {
        reply_code: short,
        reply_text: shortstr,
        exchange: shortstr,
        routing_key: shortstr,
    }
    BasicDeliver = (60, 60, "basic.deliver", content) {
        consumer_tag: shortstr,
        delivery_tag: longlong,
        redelivered: bit,
        exchange: shortstr,
        routing_key: shortstr,
    }
    BasicGet = (60, 70, "basic.get") {
        ticket: short,
        queue: shortstr,
        no_ack: bit,
    }
    BasicGetOk = (60, 71, "basic.get-ok", content) {
        delivery_tag: longlong,
        redelivered: bit,
        exchange: shortstr,
        routing_key: shortstr,
        message_count: long,
    }
    BasicGetEmpty = (60, 72, "basic.get-empty") {
        /// Reserved (was `cluster-id`).
        cluster_id: shortstr,
    }
    BasicAck = (60, 80, "basic.ack") {
        delivery_tag: longlong,
        multiple: bit,
    }
    BasicReject = (60, 90, "basic.reject") {
        delivery_tag: longlong,
        requeue: bit,
    }
    BasicRecoverAsync = (60, 100, "basic.recover-async") {
        requeue: bit,
    }
    BasicRecover = (60, 110, "basic.recover") {
        requeue: bit,
    }
    BasicRecoverOk = (60, 111, "basic.recover-ok") {}
    /// RabbitMQ extension: negative acknowledgement.
    BasicNack = (60, 120, "basic.nack") {
        delivery_tag: longlong,
        multiple: bit,
        requeue: bit,
    }

    // ---- confirm (85, RabbitMQ extension) ----
    ConfirmSelect = (85, 10, "confirm.select") {
        nowait: bit,
    }
    ConfirmSelectOk = (85, 11, "confirm.select-ok") {}

    // ---- tx (90) ----
    TxSelect = (90, 10, "tx.select") {}
    TxSelectOk = (90, 11, "tx.select-ok") {}
    TxCommit = (90, 20, "tx.commit") {}
    TxCommitOk = (90, 21, "tx.commit-ok") {}
    TxRollback = (90, 30, "tx.rollback") {}
    TxRollbackOk = (90, 31, "tx.rollback-ok") {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(m: &Method) -> BytesMut {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        out
    }

    /// Splits an encoded method into (class, method, args).
    fn split(bytes: &[u8]) -> (u16, u16, &[u8]) {
        let class_id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let method_id = u16::from_be_bytes([bytes[2], bytes[3]]);
        (class_id, method_id, &bytes[4..])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn every_method_round_trips(m in arb_method()) {
            let bytes = encode(&m);
            prop_assert_eq!(bytes.len(), m.encoded_len());
            let (c, id, args) = split(&bytes);
            prop_assert_eq!((c, id), (m.class_id(), m.method_id()));
            prop_assert_eq!(Method::decode(c, id, args)?, m);
        }

        #[test]
        fn strict_prefix_of_args_fails(m in arb_method()) {
            let bytes = encode(&m);
            let (c, id, args) = split(&bytes);
            for cut in 0..args.len() {
                prop_assert!(Method::decode(c, id, &args[..cut]).is_err());
            }
        }

        #[test]
        fn trailing_byte_fails(m in arb_method(), extra in any::<u8>()) {
            let mut bytes = encode(&m);
            bytes.put_u8(extra);
            let (c, id, args) = split(&bytes);
            let trailing = matches!(
                Method::decode(c, id, args),
                Err(DecodeError::TrailingBytes { count: 1, .. })
            );
            prop_assert!(trailing);
        }

        #[test]
        fn garbage_args_never_panic(
            idx in 0..ALL_METHODS.len(),
            args in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let (c, id, _) = ALL_METHODS[idx];
            let _ = Method::decode(c, id, &args);
        }

        #[test]
        fn garbage_ids_never_panic(c in any::<u16>(), id in any::<u16>(),
                                   args in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Method::decode(c, id, &args);
        }
    }

    #[test]
    fn table_is_complete_and_consistent() {
        assert_eq!(ALL_METHODS.len(), 64);
        for (i, &(c, id, name)) in ALL_METHODS.iter().enumerate() {
            assert!(
                ALL_METHODS[..i]
                    .iter()
                    .all(|&(c2, id2, _)| (c2, id2) != (c, id)),
                "duplicate id {c}.{id}"
            );
            // Every listed id decodes (all-zero arguments are the defaults)
            // to a method reporting the same ids and name, and re-encodes
            // to the same bytes.
            let args = default_args(c, id);
            let m = Method::decode(c, id, &args).unwrap();
            assert_eq!((m.class_id(), m.method_id(), m.name()), (c, id, name));
            assert_eq!(split(&encode(&m)), (c, id, &args[..]));
        }
        let content: Vec<_> = ALL_METHODS
            .iter()
            .filter_map(|&(c, id, name)| {
                let m = Method::decode(c, id, &default_args(c, id)).unwrap();
                m.has_content().then_some(name)
            })
            .collect();
        assert_eq!(
            content,
            [
                "basic.publish",
                "basic.return",
                "basic.deliver",
                "basic.get-ok"
            ]
        );
    }

    /// Finds the encoding of a method's default arguments by trying the
    /// shortest plausible encodings (all-zero bytes decode as defaults).
    fn default_args(c: u16, id: u16) -> Vec<u8> {
        (0..64)
            .map(|n| vec![0u8; n])
            .find(|args| Method::decode(c, id, args).is_ok())
            .unwrap()
    }

    #[test]
    fn unknown_class_and_method() {
        assert!(matches!(
            Method::decode(99, 10, &[]),
            Err(DecodeError::UnknownClass(99))
        ));
        assert!(matches!(
            Method::decode(60, 999, &[]),
            Err(DecodeError::UnknownMethod {
                class_id: 60,
                method_id: 999
            })
        ));
        assert_eq!(Method::decode(99, 10, &[]).unwrap_err().reply_code(), 540);
    }

    #[test]
    fn bit_packing() {
        // exchange.declare: passive..nowait are 5 bits in one octet.
        let m = Method::ExchangeDeclare(ExchangeDeclare {
            exchange: "x".into(),
            kind: "direct".into(),
            durable: true,
            nowait: true,
            ..Default::default()
        });
        let bytes = encode(&m);
        let mut expected = vec![0, 40, 0, 10, 0, 0, 1, b'x', 6];
        expected.extend_from_slice(b"direct");
        expected.push(0b1_0010);
        expected.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(&bytes[..], &expected[..]);

        // basic.deliver: a single bit between longlong and shortstr.
        let m = Method::BasicDeliver(BasicDeliver {
            consumer_tag: "c".into(),
            delivery_tag: 7,
            redelivered: true,
            exchange: "".into(),
            routing_key: "k".into(),
        });
        let bytes = encode(&m);
        assert_eq!(
            &bytes[..],
            &[0, 60, 0, 60, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 7, 1, 0, 1, b'k']
        );

        // basic.nack: two bits in one octet.
        let m = Method::BasicNack(BasicNack {
            delivery_tag: 1,
            multiple: false,
            requeue: true,
        });
        assert_eq!(
            &encode(&m)[..],
            &[0, 60, 0, 120, 0, 0, 0, 0, 0, 0, 0, 1, 0b10]
        );
    }

    #[test]
    fn more_than_eight_bits_use_two_octets() {
        // Exercise the packer directly: 9 consecutive bits need 2 octets.
        let mut out = BytesMut::new();
        let mut w = ArgWriter::new(&mut out);
        for i in 0..9 {
            w.bit(&(i % 2 == 0));
        }
        w.flush();
        assert_eq!(&out[..], &[0b0101_0101, 0b1]);

        let mut s = ArgSizer::default();
        for _ in 0..9 {
            s.bit(&true);
        }
        assert_eq!(s.len, 2);

        let mut r = ArgReader::new(&out, "test");
        let bits: Vec<bool> = (0..9).map(|_| r.bit().unwrap()).collect();
        assert_eq!(bits, (0..9).map(|i| i % 2 == 0).collect::<Vec<_>>());
        assert!(r.finish().is_ok());
    }

    #[test]
    fn long_shortstr_is_truncated_at_char_boundary() {
        let m = Method::QueueDeclareOk(QueueDeclareOk {
            queue: "ß".repeat(200), // 400 bytes
            ..Default::default()
        });
        let bytes = encode(&m);
        assert_eq!(bytes.len(), m.encoded_len());
        let (c, id, args) = split(&bytes);
        match Method::decode(c, id, args).unwrap() {
            Method::QueueDeclareOk(d) => assert_eq!(d.queue, "ß".repeat(127)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_shortstr_is_error() {
        let args = [1, 0xff];
        let err = Method::decode(60, 21, &args).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::InvalidUtf8 {
                context: "basic.consume-ok"
            }
        ));
        assert_eq!(err.reply_code(), 502);
    }
}
