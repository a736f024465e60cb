//! One Postgres conversation as a state machine: decoded messages in, typed outcomes out.
//!
//! No I/O and no notion of where the bytes came from: the capture path (kernel records)
//! and the inline proxy drive the same model. It keeps what a proxy must know before it
//! forwards a message and what the audit needs after: the protocol [`Phase`], prepared
//! statements and portals with their SQL, parameter types, bound values, result formats
//! and result columns (from ParameterDescription/RowDescription, kept for statements that
//! are executed later without a new Describe, as pgjdbc does), and the queue of requests
//! waiting for their responses (pipelining). Responses are matched to requests in order,
//! which is how the server answers.

use std::{
    collections::VecDeque,
    sync::{Arc, OnceLock},
};

use ahash::AHashMap as HashMap;

use crate::{
    audit::schema::{same_bytes, same_str},
    pg::{
        backend::{rows_of_tag, BackendMessage, ErrorFields, Field, Fields},
        frontend::{FrontendMessage, Target},
        wire::{I16s, Values},
    },
    sql::{split_query, Analysis, Analyzer},
    text::{ShortText, Text},
};

/// Prepared statements or portals by name. The unnamed one (most drivers' only one) has
/// its own slot: no hashing per message, and no comparison of empty names, which glibc's
/// memcmp makes with a masked vector load at the empty string's dangling address: a
/// fault-suppression assist of some hundred cycles on CPUs with AVX-512 (a quarter of the
/// decoder's time before this slot, on AMD EPYC).
#[derive(Debug)]
struct Names<V> {
    unnamed: Option<V>,
    named: HashMap<Box<str>, V>,
    /// Changes of the named entries so far (what a checkpoint of them must follow).
    version: u64,
}

impl<V> Default for Names<V> {
    fn default() -> Self {
        Names {
            unnamed: None,
            named: HashMap::default(),
            version: 0,
        }
    }
}

impl<V> Names<V> {
    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    fn get(&self, name: &str) -> Option<&V> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }
    fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        if name.is_empty() {
            self.unnamed.as_mut()
        } else {
            self.named.get_mut(name)
        }
    }
    fn insert(&mut self, name: impl AsRef<str> + Into<Box<str>>, value: V) -> Option<V> {
        if name.as_ref().is_empty() {
            self.unnamed.replace(value)
        } else {
            self.version += 1;
            self.named.insert(name.into(), value)
        }
    }
    fn remove(&mut self, name: &str) -> Option<V> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.version += 1;
            self.named.remove(name)
        }
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.unnamed.iter().chain(self.named.values())
    }
    fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.unnamed.iter_mut().chain(self.named.values_mut())
    }
    /// Takes every value (the map keeps its allocation).
    fn drain(&mut self) -> impl Iterator<Item = V> + '_ {
        self.unnamed
            .take()
            .into_iter()
            .chain(self.named.drain().map(|(_, v)| v))
    }
    /// Keeps the map's allocation.
    fn clear(&mut self) {
        self.unnamed = None;
        if !self.named.is_empty() {
            self.version += 1;
        }
        self.named.clear();
    }
}

/// Where the conversation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the client's first packet (or the next, after a refused encryption
    /// request).
    Startup,
    /// An SSLRequest (`gss` false) or GSSENCRequest waits for the server's one-byte answer.
    NegotiatingEncryption { gss: bool },
    /// The server accepted encryption: what follows on the socket is ciphertext. The
    /// conversation resumes from plaintext (a hook on the TLS library, or the proxy's own
    /// TLS) with [`Conversation::begin_plaintext`].
    Encrypted { gss: bool },
    /// The startup packet was sent; authentication and parameters until the first
    /// ReadyForQuery.
    Authenticating,
    /// Queries flow.
    Ready,
    /// A connection that only carries a CancelRequest.
    CancelRequest,
    /// The client sent Terminate: nothing more can follow.
    Terminated,
}

/// Connection facts from the startup packet and the server's parameters.
#[derive(Debug, Clone, Default)]
pub struct SessionMeta {
    pub db_user: Text,
    pub database: Text,
    pub application_name: Text,
    pub tls: bool,
    /// The backend's process id, from BackendKeyData (0 until it came).
    pub backend_pid: u32,
}

/// A result column, as RowDescription gave it, its name owned. (In a statement's
/// description the format is always 0: formats are chosen at Bind.)
pub type Column = Field<String>;

/// Bytes as text: as they came when they are UTF-8 (as names, tags and statements almost
/// always are: no copy, and none of `from_utf8_lossy`'s walk per chunk), else with
/// replacement characters.
fn text_of(b: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

pub fn columns_of(fields: &Fields<'_>) -> Arc<[Column]> {
    fields
        .iter()
        .map(|f| Column {
            name: text_of(f.name).into_owned(),
            table_oid: f.table_oid,
            column: f.column,
            type_oid: f.type_oid,
            type_size: f.type_size,
            type_modifier: f.type_modifier,
            format: f.format,
        })
        .collect()
}

/// Whether `columns` are what `fields` describe (names compared as the bytes they came
/// as, which `columns_of` kept when they were UTF-8).
fn same_columns(fields: &Fields<'_>, columns: &[Column]) -> bool {
    fields.len() == columns.len()
        && fields.iter().zip(columns).all(|(f, c)| {
            same_bytes(f.name, c.name.as_bytes())
                && f.table_oid == c.table_oid
                && f.column == c.column
                && f.type_oid == c.type_oid
                && f.type_size == c.type_size
                && f.type_modifier == c.type_modifier
                && f.format == c.format
        })
}

/// What rows belong to: the statement's text and its result columns (with formats).
pub type RowsSource = (Option<Arc<str>>, Option<Vec<Column>>);

/// What the server said of a statement when it was described.
#[derive(Debug, Clone, Default)]
pub struct Description {
    /// Parameter types as the server resolved them (a Describe of the statement), or as
    /// declared (a Describe of a portal bound to it).
    pub param_types: Arc<[u32]>,
    /// None: the statement returns no rows (NoData).
    pub columns: Option<Arc<[Column]>>,
}

/// Parameter types: the list of none shared (most drivers declare none; an empty `Arc`
/// of its own would be an allocation per statement).
fn param_types_of(types: &[u32]) -> Arc<[u32]> {
    thread_local! {
        static NONE: Arc<[u32]> = Arc::from([]);
    }
    if types.is_empty() {
        NONE.with(Arc::clone)
    } else {
        types.into()
    }
}

/// A prepared statement, named or unnamed, as the client parsed it.
#[derive(Debug)]
pub struct PreparedStatement {
    /// The statement's name, shared by the outcomes of its executions: kept for the
    /// process's life (names recur: `S_1`, `P0_1`), so copying it into every portal and
    /// event costs no atomic count.
    pub name: Text,
    pub sql: Arc<str>,
    pub analysis: Arc<Analysis>,
    /// Parameter types the client declared in Parse (0: let the server infer).
    pub declared_types: Box<[u32]>,
    /// Filled when a Describe of this statement is answered (or of a portal bound to it:
    /// its columns, and its parameter types as declared); a statement's description never
    /// changes (a new Parse makes a new statement).
    pub description: OnceLock<Description>,
    /// Only the beginning of the Parse was read (see [`StatementOutcome::cut`]): its size.
    pub cut: Option<u32>,
    /// Prepared before capture: its text was read from the server process when a Bind
    /// used it ([`Conversation::learn_prepared`]), not from the Parse.
    pub from_server: bool,
}

/// What a Bind carried, kept as it came on the wire (one shared allocation: parameter
/// formats, values, result formats; a clone shares it): the audit hashes or shows the
/// values, an approval binds them, masking reads the result formats.
#[derive(Debug, Clone, Default)]
pub struct BoundParams {
    /// Formats, values and result formats from its start to `end`; what follows is room
    /// a later Bind may write its own into ([`BoundParams::of`]). Nothing reads past `end`.
    /// None: no parts (made and dropped without touching a shared count).
    raw: Option<Arc<[u8]>>,
    count: u16,
    /// Offsets into `raw` (a Bind is one message: its parts are under 4 GiB).
    values_at: u32,
    results_at: u32,
    end: u32,
}

/// A Bind's buffer is allocated in steps of this many bytes, so the next Bind (values of
/// another length) fits in it.
const BIND_ROOM: usize = 64;

/// The largest Bind buffer a conversation keeps for the next Bind once its portal is gone.
const SPARE_BIND_MAX: usize = 4096;

impl BoundParams {
    /// A Bind's parts in one buffer: `spare` (the buffer of a Bind before) when they fit
    /// in it and nothing else holds it any more, else a new one.
    fn of(
        formats: I16s<'_>,
        values: Values<'_>,
        results: I16s<'_>,
        spare: Option<Arc<[u8]>>,
    ) -> Self {
        let parts = [formats.0, values.raw(), results.0];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 {
            return BoundParams::default();
        }
        // (A buffer much larger than these parts is let go: one huge Bind does not keep
        // its memory for the session's life.)
        let fits = |spare: &Arc<[u8]>| (len..=(2 * len).max(4 * BIND_ROOM)).contains(&spare.len());
        if let Some(mut raw) = spare.filter(fits) {
            if let Some(slots) = Arc::get_mut(&mut raw) {
                for (p, to) in parts.iter().zip(slot_ranges(&parts)) {
                    slots[to].copy_from_slice(p);
                }
                return BoundParams::laid_out(raw, &parts, values.len());
            }
        }
        // Straight into the shared allocation (a Vec first would be a second one), the
        // room after the parts zeroed.
        let room = len.next_multiple_of(BIND_ROOM);
        let mut raw = Arc::<[u8]>::new_uninit_slice(room);
        let slots = Arc::get_mut(&mut raw).expect("a new Arc is not shared");
        for b in &mut slots[len..] {
            b.write(0);
        }
        for (p, to) in parts.iter().zip(slot_ranges(&parts)) {
            slots[to].write_copy_of_slice(p);
        }
        // SAFETY: the parts fill `..len`, the room after was zeroed: every byte was
        // written.
        let raw = unsafe { raw.assume_init() };
        BoundParams::laid_out(raw, &parts, values.len())
    }

    fn laid_out(raw: Arc<[u8]>, parts: &[&[u8]; 3], count: usize) -> Self {
        let [values, results, end] = slot_ranges(parts).map(|r| r.end as u32);
        BoundParams {
            raw: Some(raw),
            count: count as u16,
            values_at: values,
            results_at: results,
            end,
        }
    }

    /// The buffer, for a later Bind to write into if by then nothing else holds it (the
    /// Execute that took it answered, its event recorded); these params are empty after.
    /// None for a large one (not kept past its portal).
    fn take_buffer(&mut self) -> Option<Arc<[u8]>> {
        if self.end > 0 && self.raw().len() <= SPARE_BIND_MAX {
            std::mem::take(self).raw
        } else {
            None
        }
    }
    /// The buffer (empty for no parts).
    fn raw(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or_default()
    }
    /// Parameter format codes.
    pub fn formats(&self) -> I16s<'_> {
        I16s(&self.raw()[..self.values_at as usize])
    }
    pub fn values(&self) -> Values<'_> {
        Values {
            count: self.count,
            raw: &self.raw()[self.values_at as usize..self.results_at as usize],
        }
    }
    /// Result-column format codes.
    pub fn result_formats(&self) -> I16s<'_> {
        I16s(&self.raw()[self.results_at as usize..self.end as usize])
    }
}

/// A kernel timestamp as the request queue holds it: nanoseconds fit an i64 until 2262
/// (saturated past it, never wrapped).
fn held(ts: i128) -> i64 {
    ts.clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// Where each of `parts` goes in a buffer of them all, one after another.
fn slot_ranges(parts: &[&[u8]; 3]) -> [std::ops::Range<usize>; 3] {
    let a = parts[0].len();
    let b = a + parts[1].len();
    [0..a, a..b, b..b + parts[2].len()]
}

/// A portal: a statement bound to values, executed by Execute.
#[derive(Debug, Clone)]
pub struct Portal {
    pub statement_name: Text,
    /// None when the statement was prepared before the conversation was seen.
    pub statement: Option<Arc<PreparedStatement>>,
    /// Values and formats from Bind.
    pub params: BoundParams,
    /// Columns, from a Describe of the portal or of its statement.
    pub columns: Option<Arc<[Column]>>,
    /// Rows from earlier Executes that stopped at their row limit.
    pub rows_so_far: u64,
    /// When its execution began (kernel ns): the first of those Executes (a portal held
    /// between Executes has it only while suspended), or the Execute it is queued for.
    pub started_ns: Option<i64>,
    /// Only the beginning of the Bind was read (its parameters are unknown): its size.
    pub params_cut: Option<u32>,
}

impl Portal {
    fn unknown() -> Self {
        Portal {
            statement_name: Text::default(),
            statement: None,
            params: BoundParams::default(),
            columns: None,
            rows_so_far: 0,
            started_ns: None,
            params_cut: None,
        }
    }

    /// The format each result column will be sent in.
    pub fn result_format_of(&self, column: usize) -> i16 {
        self.params.result_formats().format_of(column)
    }
}

#[derive(Debug)]
struct SimpleStatement {
    sql: Arc<str>,
    analysis: Arc<Analysis>,
    cut: Option<u32>,
    /// One of several statements of its query string.
    multi: bool,
}

/// A simple query's statements not answered yet, in order. Held last first, so that the
/// next is taken from the end (a string of thousands of statements is not moved for each),
/// and one statement (most strings) in place.
#[derive(Debug, Default)]
struct Statements(smallvec::SmallVec<[SimpleStatement; 1]>);

impl Statements {
    fn new(in_order: impl Iterator<Item = SimpleStatement>) -> Statements {
        let mut v: smallvec::SmallVec<[SimpleStatement; 1]> = in_order.collect();
        v.reverse();
        Statements(v)
    }
    /// The next statement to be answered.
    fn front(&self) -> Option<&SimpleStatement> {
        self.0.last()
    }
    fn pop_front(&mut self) -> Option<SimpleStatement> {
        self.0.pop()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
    /// The statements, in order.
    fn into_ordered(self) -> impl Iterator<Item = SimpleStatement> {
        self.0.into_iter().rev()
    }
}

/// A request waiting for its answer. Every request is moved into the queue and out of
/// it: kept to 128 bytes (times as i64, a portal's offsets as u32, its name as two words),
/// a move is a few inlined stores, not a call to `memcpy` (at 192 bytes, the queue's
/// moves were a twentieth of the decoder's time).
#[derive(Debug)]
enum Pending {
    Simple {
        statements: Statements,
        /// Shared by the outcomes of its statements (one Arc per query message).
        whole: Arc<str>,
        started_ns: i64,
        rows: u64,
        /// Columns of the statement whose rows are coming.
        columns: Option<Arc<[Column]>>,
    },
    /// A Parse the server has not answered yet, and the statement it replaced under the
    /// same name: if the Parse fails (or is skipped after an earlier error), the server
    /// still has the old one.
    Parse {
        statement: Arc<PreparedStatement>,
        replaced: Option<Arc<PreparedStatement>>,
    },
    /// A Bind not answered yet, with its portal's name.
    Bind {
        portal: String,
    },
    /// A Describe not answered yet: of a statement (its ParameterDescription, then
    /// RowDescription or NoData) or of a portal (RowDescription or NoData).
    Describe {
        target: Target,
        name: String,
        statement: Option<Arc<PreparedStatement>>,
        param_types: Option<Arc<[u32]>>,
    },
    /// An Execute not answered yet: its portal as it was then (a later Bind may reuse
    /// the name), its start in `portal.started_ns`.
    Execute {
        portal_name: Text,
        portal: Portal,
        rows: u64,
    },
    Sync,
    FunctionCall {
        oid: u32,
        started_ns: i64,
        /// Its result or error came (it stays queued until its ReadyForQuery).
        answered: bool,
    },
    /// Requests were lost here (bytes the capture did not see): the responses owed to
    /// them still say which statements ran, and how they ended.
    Lost {
        rows: u64,
    },
}

// (See [`Pending`]: a larger entry moves through `memcpy` again.)
const _: () = assert!(std::mem::size_of::<Pending>() <= 128);

/// Which protocol ran a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    Extended,
    /// Its request was not seen.
    Unknown,
}

/// What is known of a statement's text.
#[derive(Debug, Clone)]
pub enum StatementText {
    /// Its request was lost (bytes the capture did not see); the server's answer shows it
    /// ran.
    Lost,
    Known {
        sql: Arc<str>,
        analysis: Arc<Analysis>,
    },
    /// Executed through a statement prepared before the conversation was seen; its text
    /// was read from the server process.
    FromServer {
        sql: Arc<str>,
        analysis: Arc<Analysis>,
    },
    /// Executed through a statement prepared before the conversation was seen.
    PreparedBeforeCapture,
    /// A simple query's responses outnumbered the statements it was split into: the whole
    /// query string, since which part ran is unknown.
    Unsplit { whole: String },
}

#[derive(Debug, Clone)]
pub enum StatementResult {
    /// CommandComplete; `rows` from its tag, or DataRows counted, plus earlier Executes of
    /// the same portal.
    Completed { tag: ShortText, rows: Option<u64> },
    /// ErrorResponse. `before_execute`: refused while being parsed or bound, never ran.
    Failed {
        error: ErrorFields,
        before_execute: bool,
    },
    /// Stopped at its row limit and never resumed before the portal went away.
    Suspended { rows: u64 },
    /// The connection ended before the answer.
    NoResponse,
    /// Bytes from the server were lost while the statement waited for its answer.
    ResponseLost,
}

#[derive(Debug, Clone)]
pub struct StatementOutcome {
    pub protocol: Protocol,
    pub text: StatementText,
    /// The message carrying the statement's text (Query, Parse) or its parameters (Bind)
    /// was only partly read (larger than the capture keeps, or bytes of it were lost):
    /// its size in bytes. The text is its beginning; parameters are unknown.
    pub cut: Option<u32>,
    pub prepared_name: Text,
    pub params: Option<BoundParams>,
    pub result: StatementResult,
    pub started_ns: i128,
    pub ended_ns: i128,
    /// One of several statements of a simple query string.
    pub multi: bool,
    /// For one of several statements: the whole query string (what a proxy that refused
    /// the string whole refused).
    pub whole: Option<Arc<str>>,
}

/// What the conversation tells its driver.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The startup packet went by: `meta` now names user and database.
    SessionStarted {
        ts_ns: i128,
    },
    Statement(StatementOutcome),
    /// A FunctionCall ('F') answered with a result or an error, or never answered.
    FunctionCall {
        oid: u32,
        result: FunctionResult,
        started_ns: i128,
        ended_ns: i128,
    },
}

/// How a FunctionCall ended.
#[derive(Debug, Clone)]
pub enum FunctionResult {
    /// FunctionCallResponse.
    Returned,
    /// ErrorResponse.
    Failed(ErrorFields),
    /// Not answered: the connection ended first (`NoResponse`), or bytes from the server
    /// were lost (`ResponseLost`).
    Unanswered(StatementResult),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ConversationCounters {
    /// Responses that matched no request (lost requests, or a protocol we misread).
    pub unmatched_responses: u64,
}

pub struct Conversation {
    phase: Phase,
    pub meta: SessionMeta,
    /// Authentication or startup failure: no statement to attach it to.
    pub startup_error: Option<ErrorFields>,
    /// The startup packet was seen (user and database are known).
    startup_seen: bool,
    /// Responses are not matched until the next request (the conversation was joined
    /// mid-stream, or requests were lost).
    responses_unreliable: bool,
    /// The last ReadyForQuery's transaction status (b'I', b'T', b'E').
    transaction: u8,
    /// ReadyForQuery messages seen, and the status the last of them reported, whatever
    /// the conversation made of them (a statement's event takes the status of the first
    /// one after it: see [`Conversation::readies`]).
    readies: u64,
    last_ready: u8,
    /// While a partly read message is handled: its size.
    partial: Option<u32>,
    prepared: Names<Arc<PreparedStatement>>,
    portals: Names<Portal>,
    pending: VecDeque<Pending>,
    /// A `Pending::Lost` was queued since the last request (that request removed those
    /// before it): the next one looks for them, the others need not.
    lost_queued: bool,
    /// The buffer of the last unnamed portal that went away (at the end of its
    /// transaction), for the next Bind: held by that portal's statement until its event is
    /// recorded, then free to write over ([`BoundParams::of`]).
    spare_params: Option<Arc<[u8]>>,
    /// A statement nothing refers to any more (the unnamed one a Parse replaced, once its
    /// portal went too), for the next Parse to write over: drivers that parse the unnamed
    /// statement for each query do not allocate one each time.
    spare_statement: Option<Arc<PreparedStatement>>,
    /// The last RowDescription's columns: a driver that describes its portal before each
    /// Execute (pgbench, libpq's PQexecPrepared) gets the same ones each time, shared.
    last_columns: Option<Arc<[Column]>>,
    /// Requests were lost, and their answers may not all have come when the next request
    /// was seen: the last of the lost ones may belong to the same Sync as the requests seen
    /// after them (their answers come first, before that Sync's ReadyForQuery). An answer
    /// that ends a statement where no request seen can own it (before the first Sync
    /// queued) is one of theirs: recorded with its request lost, not left uncounted.
    lost_tail: Option<LostTail>,
    pub counters: ConversationCounters,
}

/// What came of the lost requests' answers after the next request was seen.
#[derive(Debug, Default, Clone, Copy)]
struct LostTail {
    /// Rows of the statement being answered.
    rows: u64,
    /// A statement of the lost ones was recorded from its answer (an error after it, at
    /// the Sync, is the implicit transaction's commit failing, not a statement).
    recorded: bool,
}

impl Default for Conversation {
    fn default() -> Self {
        Conversation::new()
    }
}

impl Conversation {
    /// A conversation from its first byte.
    pub fn new() -> Self {
        Conversation {
            phase: Phase::Startup,
            meta: SessionMeta::default(),
            startup_error: None,
            startup_seen: false,
            responses_unreliable: false,
            transaction: b'I',
            readies: 0,
            last_ready: 0,
            partial: None,
            prepared: Names::default(),
            portals: Names::default(),
            pending: VecDeque::new(),
            lost_queued: false,
            spare_params: None,
            spare_statement: None,
            last_columns: None,
            lost_tail: None,
            counters: ConversationCounters::default(),
        }
    }

    /// A conversation joined after its start: queries flow, and responses are matched
    /// from the next request on.
    pub fn joined_mid_stream() -> Self {
        let mut c = Conversation::new();
        c.phase = Phase::Ready;
        c.responses_unreliable = true;
        c
    }

    /// The server process named the text of statement `name` as a Bind used it (the
    /// statement was prepared before this conversation was seen). Portals bound to it,
    /// and executions waiting for their answer, get the text; later Binds find it.
    /// Returns whether it was news.
    pub fn learn_prepared(&mut self, name: &str, sql: &str, analyzer: &mut Analyzer) -> bool {
        if name.is_empty() || self.prepared.contains_key(name) {
            return false;
        }
        let statement = Arc::new(PreparedStatement {
            name: name.into(),
            analysis: analyzer.analyze(sql),
            sql: sql.into(),
            declared_types: Box::default(),
            description: OnceLock::new(),
            cut: None,
            from_server: true,
        });
        self.prepared.insert(name.to_string(), statement.clone());
        let unknown = |p: &Portal| p.statement.is_none() && same_str(&p.statement_name, name);
        for portal in self.portals.values_mut() {
            if unknown(portal) {
                portal.statement = Some(statement.clone());
            }
        }
        for p in self.pending.iter_mut() {
            if let Pending::Execute { portal, .. } = p {
                if unknown(portal) {
                    portal.statement = Some(statement.clone());
                }
            }
        }
        true
    }

    /// The named prepared statements (what a checkpoint carries to the next daemon).
    pub fn named_statements(&self) -> impl Iterator<Item = &Arc<PreparedStatement>> {
        self.prepared.named.values()
    }

    /// A number that changes whenever a named prepared statement comes or goes.
    pub fn prepared_version(&self) -> u64 {
        self.prepared.version
    }

    /// Continues a conversation the daemon before this one followed (its checkpoint):
    /// the connection's facts and its named prepared statements, as they were. Their
    /// later executions are recorded with their text, as if this daemon had seen them
    /// prepared.
    pub fn carry_in(
        &mut self,
        meta: SessionMeta,
        statements: &[(String, String)],
        analyzer: &mut Analyzer,
    ) {
        self.meta = meta;
        for (name, sql) in statements {
            if name.is_empty() || self.prepared.contains_key(name) {
                continue;
            }
            self.prepared.insert(
                name.as_str(),
                Arc::new(PreparedStatement {
                    name: Text::lasting_shape(name),
                    analysis: analyzer.analyze(sql),
                    sql: sql.as_str().into(),
                    declared_types: Box::default(),
                    description: OnceLock::new(),
                    cut: None,
                    from_server: false,
                }),
            );
        }
    }

    /// When the oldest statement still waiting for its answer began (kernel ns).
    pub fn oldest_pending_ns(&self) -> Option<i128> {
        self.pending
            .iter()
            .filter_map(|p| match p {
                Pending::Simple { started_ns, .. } | Pending::FunctionCall { started_ns, .. } => {
                    Some(i128::from(*started_ns))
                }
                Pending::Execute { portal, .. } => portal.started_ns.map(i128::from),
                _ => None,
            })
            .min()
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the startup packet was seen (a conversation joined mid-stream never sees it).
    pub fn startup_seen(&self) -> bool {
        self.startup_seen
    }

    /// The transaction status of the last ReadyForQuery.
    pub fn transaction_status(&self) -> u8 {
        self.transaction
    }

    /// How many ReadyForQuery messages the server sent, and the transaction status the
    /// last one reported (b'I', b'T', b'E'; 0 before the first). Counted whatever the
    /// conversation made of them (joined mid-stream, or after lost requests, too): each
    /// ends the server's answer to everything sent before its Sync or simple Query.
    pub fn readies(&self) -> (u64, u8) {
        (self.readies, self.last_ready)
    }

    /// A prepared statement the server has under this name (as far as seen).
    pub fn statement(&self, name: &str) -> Option<&Arc<PreparedStatement>> {
        self.prepared.get(name)
    }

    /// A portal bound and not yet closed.
    pub fn portal(&self, name: &str) -> Option<&Portal> {
        self.portals.get(name)
    }

    /// What an Execute of this portal will run and return: its SQL and result columns
    /// with the formats Bind chose (None where the conversation does not know).
    pub fn execute_target(&self, portal: &str) -> Option<(Arc<str>, Option<Vec<Column>>)> {
        let p = self.portals.get(portal)?;
        let statement = p.statement.as_ref()?;
        let columns = p
            .columns
            .clone()
            .or_else(|| statement.description.get()?.columns.clone())
            .map(|cols| {
                cols.iter()
                    .enumerate()
                    .map(|(i, c)| Column {
                        format: p.result_format_of(i),
                        ..c.clone()
                    })
                    .collect()
            });
        Some((statement.sql.clone(), columns))
    }

    /// What the rows now arriving belong to: the statement's text (None where unknown)
    /// and its result columns with the formats Bind chose (None where unknown).
    pub fn rows_source(&self) -> Option<RowsSource> {
        match self
            .pending
            .iter()
            .find(|p| matches!(p, Pending::Simple { .. } | Pending::Execute { .. }))?
        {
            Pending::Simple {
                statements,
                columns,
                ..
            } => Some((
                statements.front().map(|s| s.sql.clone()),
                columns.as_ref().map(|c| c.to_vec()),
            )),
            Pending::Execute { portal, .. } => {
                let sql = portal.statement.as_ref().map(|s| s.sql.clone());
                let columns = portal
                    .columns
                    .clone()
                    .or_else(|| {
                        portal
                            .statement
                            .as_ref()?
                            .description
                            .get()?
                            .columns
                            .clone()
                    })
                    .map(|cols| {
                        cols.iter()
                            .enumerate()
                            .map(|(i, c)| Column {
                                format: portal.result_format_of(i),
                                ..c.clone()
                            })
                            .collect()
                    });
                Some((sql, columns))
            }
            _ => None,
        }
    }

    /// Whether every request sent has been answered.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// The text of the request the server is answering now (the first not answered).
    pub fn current_sql(&self) -> Option<Arc<str>> {
        self.pending.iter().find_map(|p| match p {
            Pending::Simple { statements, .. } => statements.front().map(|s| s.sql.clone()),
            Pending::Execute { portal, .. } => portal.statement.as_ref().map(|s| s.sql.clone()),
            Pending::Parse { statement, .. } => Some(statement.sql.clone()),
            Pending::Bind { portal } => self
                .portals
                .get(portal)
                .and_then(|p| p.statement.as_ref())
                .map(|s| s.sql.clone()),
            _ => None,
        })
    }

    /// Requests were lost (bytes the capture did not see, a request that could not be
    /// read): the responses owed to them, after those of the requests before, are
    /// recorded as statements whose text is unknown, until the client's next request.
    pub fn requests_lost(&mut self) {
        if !matches!(self.pending.back(), Some(Pending::Lost { .. })) {
            self.pending.push_back(Pending::Lost { rows: 0 });
            self.lost_queued = true;
        }
        self.lost_tail = Some(LostTail::default());
    }

    /// An untyped startup-phase packet from the client.
    pub fn on_startup(&mut self, m: &FrontendMessage<'_>, ts: i128, out: &mut Vec<Outcome>) {
        match m {
            FrontendMessage::Startup { params, .. } => {
                self.phase = Phase::Authenticating;
                self.startup_seen = true;
                for (k, v) in params {
                    let v = String::from_utf8_lossy(v);
                    match *k {
                        b"user" => self.meta.db_user = Text::lasting(&v),
                        b"database" => self.meta.database = Text::lasting(&v),
                        b"application_name" => self.meta.application_name = Text::lasting(&v),
                        _ => {}
                    }
                }
                if self.meta.database.is_empty() {
                    self.meta.database = self.meta.db_user.clone();
                }
                out.push(Outcome::SessionStarted { ts_ns: ts });
            }
            FrontendMessage::SslRequest => self.phase = Phase::NegotiatingEncryption { gss: false },
            FrontendMessage::GssEncRequest => {
                self.phase = Phase::NegotiatingEncryption { gss: true }
            }
            FrontendMessage::CancelRequest { .. } => self.phase = Phase::CancelRequest,
            _ => {}
        }
    }

    /// The server's one-byte answer to an encryption request: 'S' (TLS), 'G' (GSSAPI) or
    /// 'N' (refused: the client goes on in plaintext with a startup packet).
    pub fn on_encryption_reply(&mut self, reply: u8) {
        self.phase = match reply {
            b'S' => {
                self.meta.tls = true;
                Phase::Encrypted { gss: false }
            }
            b'G' => Phase::Encrypted { gss: true },
            _ => Phase::Startup,
        };
    }

    /// The connection's bytes are TLS records from the start of what is seen.
    pub fn assume_tls(&mut self) {
        self.meta.tls = true;
        self.phase = Phase::Encrypted { gss: false };
    }

    /// Plaintext starts: with the startup packet (`from_startup`), or in the middle of the
    /// conversation (matched from the next request on).
    pub fn begin_plaintext(&mut self, from_startup: bool) {
        self.meta.tls = true;
        if from_startup {
            self.phase = Phase::Startup;
        } else {
            self.phase = Phase::Ready;
            self.responses_unreliable = true;
        }
    }

    /// A client message of which only the beginning was read (`frontend::decode_partial`),
    /// `size` bytes long: the statement it carries is recorded with what is known.
    pub fn on_frontend_partial(
        &mut self,
        m: FrontendMessage<'_>,
        size: u32,
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Outcome>,
    ) {
        self.partial = Some(size);
        self.on_frontend(m, ts, analyzer, out);
        self.partial = None;
    }

    /// A typed message from the client.
    pub fn on_frontend(
        &mut self,
        m: FrontendMessage<'_>,
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Outcome>,
    ) {
        // A request after a gap: from here on responses match requests again. Clients wait
        // for answers before sending more (or pipeline from here on): the requests lost in
        // the gap are answered by now, so matching starts over.
        let is_request = matches!(
            m,
            FrontendMessage::Query { .. }
                | FrontendMessage::Parse { .. }
                | FrontendMessage::Bind { .. }
                | FrontendMessage::Execute { .. }
                | FrontendMessage::Sync
                | FrontendMessage::FunctionCall { .. }
        );
        if is_request && self.responses_unreliable {
            self.responses_unreliable = false;
            self.pending.clear();
        }
        if is_request && std::mem::take(&mut self.lost_queued) {
            // The lost requests are answered by now (or the client pipelines past them,
            // and matching goes on from the requests it is seen to send).
            self.pending.retain(|p| !matches!(p, Pending::Lost { .. }));
        }
        match m {
            FrontendMessage::Query { sql } => {
                let (whole, split) = split_query(&text_of(sql));
                let multi = split.len() > 1;
                let statements = Statements::new(split.into_iter().map(|s| {
                    let analysis = analyzer.analyze_shared(&s);
                    SimpleStatement {
                        sql: s,
                        analysis,
                        cut: self.partial,
                        multi,
                    }
                }));
                self.pending.push_back(Pending::Simple {
                    statements,
                    whole,
                    started_ns: held(ts),
                    rows: 0,
                    columns: None,
                });
            }
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } => {
                let name = text_of(name).into_owned();
                // The same text parsed again under the same name (the unnamed statement
                // before each execution: libpq's extended protocol, most drivers'
                // unprepared statements) shares the text and analysis it had: no UTF-8
                // check, cache lookup or shape per statement.
                let again = self
                    .prepared
                    .get(&name)
                    .filter(|old| self.partial.is_none() && same_bytes(old.sql.as_bytes(), sql))
                    .map(|old| (old.sql.clone(), old.analysis.clone()));
                let (sql, analysis) = again.unwrap_or_else(|| analyzer.analyze_text(&text_of(sql)));
                let parsed = PreparedStatement {
                    name: Text::lasting_shape(&name),
                    analysis,
                    sql,
                    declared_types: param_types.iter().collect(),
                    description: OnceLock::new(),
                    cut: self.partial,
                    from_server: false,
                };
                let statement = match self.spare_statement.take() {
                    Some(mut spare) => match Arc::get_mut(&mut spare) {
                        Some(s) => {
                            *s = parsed;
                            spare
                        }
                        None => Arc::new(parsed),
                    },
                    None => Arc::new(parsed),
                };
                let replaced = self.prepared.insert(name, statement.clone());
                self.pending.push_back(Pending::Parse {
                    statement,
                    replaced,
                });
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                let portal = text_of(portal).into_owned();
                // The buffer of the portal this Bind replaces (unless it is suspended: its
                // statement is recorded below, with its values), or of the last portal
                // gone: written over if nothing holds it any more (no allocation per
                // statement).
                let spare = self
                    .portals
                    .get_mut(&portal)
                    .filter(|p| p.started_ns.is_none())
                    .and_then(|p| p.params.take_buffer())
                    .or_else(|| self.spare_params.take());
                let name = text_of(statement);
                let statement = self.prepared.get(name.as_ref()).cloned();
                let statement_name = match &statement {
                    Some(p) => p.name.clone(),
                    None => Text::lasting_shape(&name),
                };
                let replaced = self.portals.insert(
                    portal.clone(),
                    Portal {
                        statement_name,
                        statement,
                        params: BoundParams::of(param_formats, params, result_formats, spare),
                        columns: None,
                        rows_so_far: 0,
                        started_ns: None,
                        params_cut: self.partial,
                    },
                );
                if let Some(mut old) = replaced {
                    if old.started_ns.is_none() {
                        self.spare(old.statement.take());
                    }
                    // A portal left suspended at its row limit ends here.
                    self.finish_suspended(old, ts, out);
                }
                self.pending.push_back(Pending::Bind { portal });
            }
            FrontendMessage::Describe { target, name } => {
                let name = text_of(name).into_owned();
                let statement = match target {
                    Target::Statement => self.prepared.get(&name).cloned(),
                    Target::Portal => None,
                };
                self.pending.push_back(Pending::Describe {
                    target,
                    name,
                    statement,
                    param_types: None,
                });
            }
            FrontendMessage::Execute { portal, .. } => {
                let portal = text_of(portal);
                let mut p = match self.portals.get_mut(&portal) {
                    Some(p) => {
                        let taken = p.clone();
                        // A suspended portal resumes in this Execute: it is recorded when
                        // this one ends, not again when the portal goes away.
                        p.started_ns = None;
                        p.rows_so_far = 0;
                        taken
                    }
                    None => Portal::unknown(),
                };
                p.started_ns = p.started_ns.or(Some(held(ts)));
                self.pending.push_back(Pending::Execute {
                    portal_name: Text::from(portal),
                    portal: p,
                    rows: 0,
                });
            }
            FrontendMessage::Close { target, name } => {
                let name = text_of(name);
                if target == Target::Statement {
                    self.prepared.remove(name.as_ref());
                } else if let Some(old) = self.portals.remove(name.as_ref()) {
                    self.finish_suspended(old, ts, out);
                }
            }
            FrontendMessage::Sync => self.pending.push_back(Pending::Sync),
            FrontendMessage::FunctionCall { oid, .. } => {
                self.pending.push_back(Pending::FunctionCall {
                    oid,
                    started_ns: held(ts),
                    answered: false,
                })
            }
            FrontendMessage::Terminate => self.phase = Phase::Terminated,
            // Startup-phase and COPY sub-protocol messages, Flush: no queue entry.
            _ => {}
        }
    }

    /// A typed message from the server.
    /// `n` DataRows (their values unread): counted for the statement they answer.
    pub fn on_data_rows(&mut self, n: u64) {
        if self.responses_unreliable {
            self.counters.unmatched_responses += n;
            return;
        }
        if let Some(Pending::Lost { rows }) = self.pending.front_mut() {
            *rows += n;
            return;
        }
        if let Some(tail) = &mut self.lost_tail {
            // Rows before the first Sync queued belong to no request seen since.
            let owner = self.pending.iter().find(|p| {
                matches!(
                    p,
                    Pending::Simple { .. }
                        | Pending::Execute { .. }
                        | Pending::Sync
                        | Pending::FunctionCall { .. }
                )
            });
            if !matches!(
                owner,
                Some(Pending::Simple { .. } | Pending::Execute { .. })
            ) {
                tail.rows += n;
                return;
            }
        }
        match self
            .pending
            .iter_mut()
            .find(|p| matches!(p, Pending::Simple { .. } | Pending::Execute { .. }))
        {
            Some(Pending::Simple { rows, .. }) | Some(Pending::Execute { rows, .. }) => *rows += n,
            _ => self.counters.unmatched_responses += n,
        }
    }

    /// (By reference: a message moved out of its decoder's result is read back with wide
    /// loads over the narrow stores that built it, a store-forwarding stall per message.)
    pub fn on_backend(&mut self, m: &BackendMessage<'_>, ts: i128, out: &mut Vec<Outcome>) {
        if let BackendMessage::ReadyForQuery { status } = m {
            self.readies += 1;
            self.last_ready = *status;
        }
        match m {
            BackendMessage::DataRow(_) => return self.on_data_rows(1),
            BackendMessage::ParameterStatus { name, value } => {
                if *name == b"application_name" {
                    self.meta.application_name = Text::lasting(&String::from_utf8_lossy(value));
                } else if *name == b"session_authorization"
                    && self.phase == Phase::Authenticating
                    && !value.is_empty()
                {
                    // The role the session authenticated as, which the server reports
                    // at start-up: the startup packet's user unless something between
                    // client and server logged in for it (the proxy's credentials).
                    self.meta.db_user = Text::lasting(&String::from_utf8_lossy(value));
                }
                return;
            }
            BackendMessage::NoticeResponse(_) | BackendMessage::NotificationResponse { .. } => {
                return
            }
            BackendMessage::BackendKeyData { pid, .. } => {
                self.meta.backend_pid = *pid;
                return;
            }
            BackendMessage::ErrorResponse(e) if self.phase == Phase::Authenticating => {
                self.startup_error = Some(e.summary());
                return;
            }
            BackendMessage::ReadyForQuery { status } if self.phase == Phase::Authenticating => {
                self.phase = Phase::Ready;
                self.transaction = *status;
                return;
            }
            _ => {}
        }
        if self.responses_unreliable {
            self.counters.unmatched_responses += 1;
            return;
        }
        if let Some(Pending::Lost { rows }) = self.pending.front_mut() {
            let result = match m {
                BackendMessage::CommandComplete { tag } => {
                    let tag = text_of(tag);
                    let rows = rows_of(&tag, std::mem::take(rows), 0);
                    Some(StatementResult::Completed {
                        tag: ShortText::new(&tag),
                        rows,
                    })
                }
                BackendMessage::ErrorResponse(e) => {
                    *rows = 0;
                    Some(StatementResult::Failed {
                        error: e.summary(),
                        before_execute: false,
                    })
                }
                BackendMessage::PortalSuspended => Some(StatementResult::Suspended {
                    rows: std::mem::take(rows),
                }),
                BackendMessage::ReadyForQuery { status } => {
                    self.transaction = *status;
                    None
                }
                // ParseComplete, BindComplete, descriptions: of statements not seen.
                _ => None,
            };
            if let Some(result) = result {
                out.push(lost_statement(result, ts));
            }
            return;
        }
        match m {
            BackendMessage::ParseComplete => match self.pending.front() {
                Some(Pending::Parse { .. }) => {
                    if let Some(Pending::Parse { replaced, .. }) = self.pending.pop_front() {
                        self.spare(replaced);
                    }
                }
                _ => self.counters.unmatched_responses += 1,
            },
            BackendMessage::BindComplete => {
                self.pop_front_matching(|p| matches!(p, Pending::Bind { .. }))
            }
            BackendMessage::ParameterDescription(oids) => match self.pending.front_mut() {
                Some(Pending::Describe {
                    target: Target::Statement,
                    param_types,
                    ..
                }) => *param_types = Some(oids.iter().collect()),
                _ => self.counters.unmatched_responses += 1,
            },
            BackendMessage::RowDescription(fields) => {
                let columns = match &self.last_columns {
                    Some(c) if same_columns(fields, c) => c.clone(),
                    _ => {
                        let c = columns_of(fields);
                        self.last_columns = Some(c.clone());
                        c
                    }
                };
                match self.pending.front_mut() {
                    Some(Pending::Simple { columns: c, .. }) => *c = Some(columns),
                    Some(Pending::Describe { .. }) => self.described(Some(columns)),
                    _ => self.counters.unmatched_responses += 1,
                }
            }
            BackendMessage::NoData => match self.pending.front() {
                Some(Pending::Describe { .. }) => self.described(None),
                _ => self.counters.unmatched_responses += 1,
            },
            BackendMessage::CommandComplete { tag } => {
                self.complete(Some(&text_of(tag)), None, ts, out)
            }
            BackendMessage::EmptyQueryResponse => self.complete(None, None, ts, out),
            BackendMessage::ErrorResponse(e) => self.complete(None, Some(e.summary()), ts, out),
            BackendMessage::PortalSuspended => self.suspended(ts, out),
            BackendMessage::FunctionCallResponse { .. } => match self.pending.front_mut() {
                Some(Pending::FunctionCall {
                    oid,
                    started_ns,
                    answered,
                }) if !*answered => {
                    *answered = true;
                    out.push(Outcome::FunctionCall {
                        oid: *oid,
                        result: FunctionResult::Returned,
                        started_ns: (*started_ns).into(),
                        ended_ns: ts,
                    });
                }
                _ => self.counters.unmatched_responses += 1,
            },
            BackendMessage::ReadyForQuery { status } => {
                self.transaction = *status;
                // Ends one Sync, simple Query or FunctionCall, with everything before it.
                while let Some(p) = self.pending.pop_front() {
                    if matches!(
                        p,
                        Pending::Sync | Pending::Simple { .. } | Pending::FunctionCall { .. }
                    ) {
                        break;
                    }
                }
                // The lost requests' answers end with the first ReadyForQuery after the
                // next request seen, at the latest.
                if !self
                    .pending
                    .iter()
                    .any(|p| matches!(p, Pending::Lost { .. }))
                {
                    self.lost_tail = None;
                }
                if *status == b'I' {
                    // Transaction over: every portal is gone (prepared statements stay).
                    self.end_portals(ts, out);
                }
            }
            _ => {}
        }
    }

    /// A Describe is answered (RowDescription or NoData): the statement or portal keeps
    /// its columns.
    fn described(&mut self, mut columns: Option<Arc<[Column]>>) {
        let Some(Pending::Describe {
            target,
            name,
            statement,
            param_types,
        }) = self.pending.pop_front()
        else {
            return;
        };
        match target {
            Target::Statement => {
                if let Some(s) = statement {
                    let _ = s.description.set(Description {
                        param_types: param_types.unwrap_or_else(|| param_types_of(&[])),
                        columns,
                    });
                }
            }
            Target::Portal => {
                // Executes of this portal already sent (Parse, Bind, Describe, Execute in
                // one batch, as pgjdbc sends them) took the portal before its columns
                // came: they get them too, up to a Bind that makes the name another
                // portal.
                let mut rebound = false;
                // The portal's statement (the first of these that has one: all are the
                // same portal's), taken only if it has no description yet (most have
                // one: a shared count not touched per statement).
                let mut statement: Option<Option<Arc<PreparedStatement>>> = None;
                let undescribed =
                    |s: &Arc<PreparedStatement>| s.description.get().is_none().then(|| s.clone());
                for p in self.pending.iter_mut() {
                    match p {
                        Pending::Bind { portal } if same_str(portal, &name) => {
                            rebound = true;
                            break;
                        }
                        Pending::Execute {
                            portal_name,
                            portal,
                            ..
                        } if same_str(portal_name, &name) => {
                            if portal.columns.is_none() {
                                portal.columns = columns.clone();
                            }
                            if statement.is_none() {
                                statement = portal.statement.as_ref().map(undescribed);
                            }
                        }
                        _ => {}
                    }
                }
                let statement = match self.portals.get_mut(&name).filter(|_| !rebound) {
                    Some(p) => {
                        let statement = statement.or_else(|| p.statement.as_ref().map(undescribed));
                        let statement = statement.flatten();
                        // The columns move to the portal unless its statement takes them
                        // too.
                        p.columns = if statement.is_some() {
                            columns.clone()
                        } else {
                            columns.take()
                        };
                        statement
                    }
                    None => statement.flatten(),
                };
                // Its statement returns the same columns each time it runs: a driver that
                // described a portal once (pgjdbc, when it switches to a named statement)
                // executes the statement again without any Describe.
                // (As a statement's description has them: in text format, shared as they
                // are when the portal's are, as most are.)
                if let Some(s) = statement {
                    let _ = s.description.set(Description {
                        param_types: param_types_of(&s.declared_types),
                        columns: columns.map(|cols| {
                            if cols.iter().all(|c| c.format == 0) {
                                return cols;
                            }
                            cols.iter()
                                .map(|c| Column {
                                    format: 0,
                                    ..c.clone()
                                })
                                .collect()
                        }),
                    });
                }
            }
        }
    }

    fn pop_front_matching(&mut self, is: impl Fn(&Pending) -> bool) {
        if self.pending.front().is_some_and(is) {
            self.pending.pop_front();
        } else {
            self.counters.unmatched_responses += 1;
        }
    }

    /// Pops Parse/Bind/Describe entries ahead of the first Execute and returns that Execute.
    fn pop_until_execute(&mut self) -> Option<Pending> {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::Parse { .. } | Pending::Bind { .. } | Pending::Describe { .. } => {
                    self.pending.pop_front();
                }
                Pending::Execute { .. } => return self.pending.pop_front(),
                _ => return None,
            }
        }
        None
    }

    /// The portal stopped at its row limit. A later Execute of the same portal resumes it:
    /// carry the rows and the start time to it (already queued when pipelined); otherwise
    /// keep them with the portal until it is resumed or goes away (then the execution is
    /// recorded as it stands).
    fn suspended(&mut self, ts: i128, out: &mut Vec<Outcome>) {
        let Some(Pending::Execute {
            portal_name,
            mut portal,
            rows,
        }) = self.pop_until_execute()
        else {
            return;
        };
        let started_ns = portal.started_ns;
        let carried = portal.rows_so_far + rows;
        let mut rebound = false;
        let mut queued = None;
        for p in self.pending.iter_mut() {
            match p {
                Pending::Bind { portal: n } if same_str(n, &portal_name) => {
                    rebound = true;
                    break;
                }
                Pending::Execute {
                    portal_name: n,
                    portal: q,
                    ..
                } if same_str(n, &portal_name) => {
                    queued = Some(q);
                    break;
                }
                _ => {}
            }
        }
        portal.rows_so_far = carried;
        match queued {
            Some(next) => {
                next.rows_so_far = carried;
                next.started_ns = started_ns;
            }
            // A new portal of that name is already bound: this one is over.
            None if rebound => self.finish_suspended(portal, ts, out),
            None => {
                if let Some(old) = self.portals.insert(portal_name.as_str(), portal) {
                    self.finish_suspended(old, ts, out);
                }
            }
        }
    }

    /// The outcome of an Execute of `portal` (begun at its `started_ns`, else `ended`).
    fn extended(portal: Portal, result: StatementResult, ended: i128) -> Outcome {
        let started = portal.started_ns.map_or(ended, i128::from);
        Outcome::Statement(StatementOutcome {
            protocol: Protocol::Extended,
            cut: portal
                .statement
                .as_ref()
                .and_then(|s| s.cut)
                .or(portal.params_cut),
            text: match &portal.statement {
                Some(s) if s.from_server => StatementText::FromServer {
                    sql: s.sql.clone(),
                    analysis: s.analysis.clone(),
                },
                Some(s) => StatementText::Known {
                    sql: s.sql.clone(),
                    analysis: s.analysis.clone(),
                },
                None => StatementText::PreparedBeforeCapture,
            },
            prepared_name: portal.statement_name,
            params: Some(portal.params),
            result,
            started_ns: started,
            ended_ns: ended,
            multi: false,
            whole: None,
        })
    }

    /// CommandComplete, EmptyQueryResponse or ErrorResponse: ends one statement.
    fn complete(
        &mut self,
        tag: Option<&str>,
        error: Option<ErrorFields>,
        ts: i128,
        out: &mut Vec<Outcome>,
    ) {
        let owned = match self.pending.front() {
            None | Some(Pending::Sync) => false,
            Some(Pending::Parse { .. } | Pending::Bind { .. } | Pending::Describe { .. }) => {
                // Extended requests seen: owned by an Execute before the first Sync (an
                // error, by whichever of them failed).
                error.is_some()
                    || self
                        .pending
                        .iter()
                        .take_while(|p| !matches!(p, Pending::Sync))
                        .any(|p| matches!(p, Pending::Execute { .. }))
            }
            Some(_) => true,
        };
        if !owned && self.lost_tail.is_some() {
            return self.lost_answer(tag, error, ts, out);
        }
        let Some(front) = self.pending.front_mut() else {
            self.counters.unmatched_responses += 1;
            return;
        };
        match front {
            Pending::Simple {
                statements,
                whole,
                started_ns,
                rows,
                columns,
            } => {
                let st = statements.pop_front();
                let data_rows = std::mem::take(rows);
                *columns = None;
                let start = i128::from(*started_ns);
                *started_ns = held(ts);
                if tag.is_none() && error.is_none() {
                    return; // empty query
                }
                if error.is_some() {
                    // The rest of the string is not executed.
                    statements.clear();
                }
                let cut = st.as_ref().and_then(|s| s.cut);
                let multi = st.as_ref().is_some_and(|s| s.multi);
                let text = match st {
                    Some(s) => StatementText::Known {
                        sql: s.sql,
                        analysis: s.analysis,
                    },
                    None => StatementText::Unsplit {
                        whole: whole.to_string(),
                    },
                };
                out.push(Outcome::Statement(StatementOutcome {
                    protocol: Protocol::Simple,
                    cut,
                    text,
                    prepared_name: Text::default(),
                    params: None,
                    result: match (tag, error) {
                        (_, Some(error)) => StatementResult::Failed {
                            error,
                            before_execute: false,
                        },
                        (Some(tag), None) => StatementResult::Completed {
                            rows: rows_of(tag, data_rows, 0),
                            tag: ShortText::new(tag),
                        },
                        (None, None) => unreachable!("empty queries returned above"),
                    },
                    started_ns: start,
                    ended_ns: ts,
                    multi,
                    whole: multi.then(|| whole.clone()),
                }));
            }
            Pending::Parse { .. }
            | Pending::Bind { .. }
            | Pending::Describe { .. }
            | Pending::Execute { .. } => {
                if let Some(e) = error {
                    self.fail_extended(e, ts, out);
                    return;
                }
                let Some(Pending::Execute { portal, rows, .. }) = self.pop_until_execute() else {
                    self.counters.unmatched_responses += 1;
                    return;
                };
                let Some(tag) = tag else {
                    return; // empty query
                };
                let result = StatementResult::Completed {
                    rows: rows_of(tag, rows, portal.rows_so_far),
                    tag: ShortText::new(tag),
                };
                out.push(Self::extended(portal, result, ts));
            }
            Pending::FunctionCall {
                oid,
                started_ns,
                answered,
            } => match error {
                Some(e) if !*answered => {
                    *answered = true;
                    out.push(Outcome::FunctionCall {
                        oid: *oid,
                        result: FunctionResult::Failed(e),
                        started_ns: (*started_ns).into(),
                        ended_ns: ts,
                    })
                }
                _ => self.counters.unmatched_responses += 1,
            },
            // An error at Sync (a deferred constraint at implicit commit).
            Pending::Sync => self.counters.unmatched_responses += 1,
            // Answered in `on_backend` before it gets here.
            Pending::Lost { .. } => self.counters.unmatched_responses += 1,
        }
    }

    /// The end of a statement no request seen owns, while the lost requests' answers may
    /// still come: one of theirs, recorded with its request lost. An error after one of
    /// them was recorded is the implicit transaction's commit failing at its Sync.
    fn lost_answer(
        &mut self,
        tag: Option<&str>,
        error: Option<ErrorFields>,
        ts: i128,
        out: &mut Vec<Outcome>,
    ) {
        let Some(tail) = &mut self.lost_tail else {
            return;
        };
        let rows = std::mem::take(&mut tail.rows);
        let result = match (tag, error) {
            (_, Some(_)) if tail.recorded => None,
            (_, Some(error)) => Some(StatementResult::Failed {
                error,
                before_execute: false,
            }),
            (Some(tag), None) => Some(StatementResult::Completed {
                rows: rows_of(tag, rows, 0),
                tag: ShortText::new(tag),
            }),
            // An empty query: nothing ran.
            (None, None) => return,
        };
        let Some(result) = result else {
            self.counters.unmatched_responses += 1;
            return;
        };
        tail.recorded = true;
        out.push(lost_statement(result, ts));
    }

    /// An error in the extended protocol: it belongs to the statement being prepared,
    /// bound or executed; the server skips everything after it until Sync. A statement
    /// that failed while being prepared or bound (never executed) keeps its text and is
    /// flagged `before_execute`; Parses that failed or were skipped did not create their
    /// statements, so the names keep what the server still has.
    fn fail_extended(&mut self, e: ErrorFields, ts: i128, out: &mut Vec<Outcome>) {
        let mut victim: Option<Portal> = None;
        let mut failed_parse: Option<Arc<PreparedStatement>> = None;
        let mut undone: Vec<(Arc<PreparedStatement>, Option<Arc<PreparedStatement>>)> = Vec::new();
        let mut before_execute = true;
        let mut first = true;
        while let Some(front) = self.pending.front() {
            if matches!(front, Pending::Sync) {
                break;
            }
            match self.pending.pop_front().expect("front exists") {
                Pending::Parse {
                    statement,
                    replaced,
                } => {
                    if first {
                        failed_parse = Some(statement.clone());
                    }
                    undone.push((statement, replaced));
                }
                Pending::Execute { portal, .. } => {
                    if first {
                        before_execute = false;
                    }
                    if victim.is_none() {
                        victim = Some(portal);
                    }
                }
                _ => {}
            }
            first = false;
        }
        for (statement, replaced) in undone.into_iter().rev() {
            let name = statement.name.to_string();
            if !self
                .prepared
                .get(&name)
                .is_some_and(|current| Arc::ptr_eq(current, &statement))
            {
                continue;
            }
            match replaced {
                // The unnamed statement is dropped before a new one is parsed.
                Some(old) if !name.is_empty() => {
                    self.prepared.insert(name, old);
                }
                _ => {
                    self.prepared.remove(&name);
                }
            }
        }
        let portal = match (failed_parse, victim) {
            (Some(failed), Some(p))
                if p.statement
                    .as_ref()
                    .is_some_and(|bound| Arc::ptr_eq(bound, &failed)) =>
            {
                p
            }
            (Some(failed), _) => Portal {
                statement_name: failed.name.clone(),
                statement: Some(failed),
                ..Portal::unknown()
            },
            (None, Some(p)) => p,
            (None, None) => Portal::unknown(),
        };
        let result = StatementResult::Failed {
            error: e,
            before_execute,
        };
        out.push(Self::extended(portal, result, ts));
    }

    /// Keeps `statement` for the next Parse if nothing else holds it.
    fn spare(&mut self, statement: Option<Arc<PreparedStatement>>) {
        if let Some(s) = statement.filter(|s| Arc::strong_count(s) == 1) {
            self.spare_statement = Some(s);
        }
    }

    /// Every portal is gone (the transaction or the session ended).
    fn end_portals(&mut self, ts: i128, out: &mut Vec<Outcome>) {
        if self.portals.values().all(|p| p.started_ns.is_none()) {
            if let Some(p) = self.portals.unnamed.as_mut() {
                self.spare_params = p.params.take_buffer().or(self.spare_params.take());
            }
            self.portals.clear(); // (keeps the map's allocation)
            return;
        }
        let suspended: Vec<Portal> = self
            .portals
            .drain()
            .filter(|p| p.started_ns.is_some())
            .collect();
        for portal in suspended {
            self.finish_suspended(portal, ts, out);
        }
    }

    /// The execution of a portal that stopped at its row limit (PortalSuspended) and was
    /// not run to completion: it ends unresumed when the portal goes away (Close, a Bind
    /// reusing its name, the end of the transaction, the end of the session).
    fn finish_suspended(&mut self, portal: Portal, ts: i128, out: &mut Vec<Outcome>) {
        if portal.started_ns.is_none() {
            return;
        }
        let rows = portal.rows_so_far;
        out.push(Self::extended(
            portal,
            StatementResult::Suspended { rows },
            ts,
        ));
    }

    /// The connection ended: requests that never got an answer, and portals left
    /// suspended.
    pub fn abandon(&mut self, ts: i128, out: &mut Vec<Outcome>) {
        self.end_portals(ts, out);
        self.end_pending(StatementResult::NoResponse, ts, out);
    }

    /// Bytes from the server were lost, how many messages is unknown: the answers to the
    /// requests in flight may have been among them. Those statements end here, their
    /// outcome unknown, and answers are not matched again until the next request: an
    /// answer that did come would otherwise go to the wrong statement, and every statement
    /// after it to the answer of the one before.
    pub fn answers_lost(&mut self, ts: i128, out: &mut Vec<Outcome>) {
        self.end_pending(StatementResult::ResponseLost, ts, out);
        self.responses_unreliable = true;
    }

    /// Ends every request in flight with `result`.
    fn end_pending(&mut self, result: StatementResult, ts: i128, out: &mut Vec<Outcome>) {
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Simple {
                    statements,
                    whole,
                    started_ns,
                    ..
                } => {
                    for s in statements.into_ordered() {
                        out.push(Outcome::Statement(StatementOutcome {
                            protocol: Protocol::Simple,
                            cut: s.cut,
                            text: StatementText::Known {
                                sql: s.sql,
                                analysis: s.analysis,
                            },
                            prepared_name: Text::default(),
                            params: None,
                            result: result.clone(),
                            started_ns: started_ns.into(),
                            ended_ns: ts,
                            multi: s.multi,
                            whole: s.multi.then(|| whole.clone()),
                        }));
                    }
                }
                Pending::Execute { portal, .. } => {
                    out.push(Self::extended(portal, result.clone(), ts))
                }
                Pending::FunctionCall {
                    oid,
                    started_ns,
                    answered: false,
                } => out.push(Outcome::FunctionCall {
                    oid,
                    result: FunctionResult::Unanswered(result.clone()),
                    started_ns: started_ns.into(),
                    ended_ns: ts,
                }),
                _ => {}
            }
        }
    }
}

/// Rows of a completed statement: the tag's count, else the DataRows seen (if any), plus
/// rows of earlier Executes of the same portal (a tag counts only the last one).
/// A statement whose request was lost, recorded from its answer (`result`, at `ts`).
fn lost_statement(result: StatementResult, ts: i128) -> Outcome {
    Outcome::Statement(StatementOutcome {
        protocol: Protocol::Unknown,
        text: StatementText::Lost,
        cut: None,
        prepared_name: Text::default(),
        params: None,
        result,
        started_ns: ts,
        ended_ns: ts,
        multi: false,
        whole: None,
    })
}

fn rows_of(tag: &str, data_rows: u64, prior_rows: u64) -> Option<u64> {
    rows_of_tag(tag)
        .or((data_rows > 0).then_some(data_rows))
        .map(|r| r + prior_rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{backend, frontend, tokenizer::frame};

    /// Feeds one encoded stream of typed messages from a direction.
    fn feed(c: &mut Conversation, from_client: bool, stream: &[u8], out: &mut Vec<Outcome>) {
        let mut analyzer = Analyzer::default();
        let mut at = 0;
        while at < stream.len() {
            let tag = stream[at];
            let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
            let body = &stream[at + 5..at + 1 + len];
            if from_client {
                c.on_frontend(frontend::decode(tag, body).unwrap(), 0, &mut analyzer, out);
            } else {
                c.on_backend(&backend::decode(tag, body).unwrap(), 0, out);
            }
            at += 1 + len;
        }
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn row_description(cols: &[(&str, u32, i16, u32)]) -> Vec<u8> {
        row_description_in(cols, 0)
    }

    /// Describe of the unnamed portal, Execute, Sync.
    fn portal_described_and_run() -> Vec<u8> {
        let mut m = frame(b'D', b"P\0");
        m.extend(frame(b'E', b"\0\0\0\0\0"));
        m.extend(frame(b'S', b""));
        m
    }

    /// ParseComplete, BindComplete.
    fn parsed_and_bound() -> Vec<u8> {
        let mut m = frame(b'1', b"");
        m.extend(frame(b'2', b""));
        m
    }

    /// A RowDescription whose columns are all in `format`.
    fn row_description_in(cols: &[(&str, u32, i16, u32)], format: i16) -> Vec<u8> {
        let mut b = (cols.len() as u16).to_be_bytes().to_vec();
        for (name, table, attnum, type_oid) in cols {
            b.extend(cstr(name));
            b.extend(table.to_be_bytes());
            b.extend(attnum.to_be_bytes());
            b.extend(type_oid.to_be_bytes());
            b.extend((-1i16).to_be_bytes());
            b.extend((-1i32).to_be_bytes());
            b.extend(format.to_be_bytes());
        }
        frame(b'T', &b)
    }

    fn ready() -> Conversation {
        let mut c = Conversation::new();
        let mut out = Vec::new();
        let startup = FrontendMessage::Startup {
            protocol: crate::pg::PROTOCOL_3_0,
            params: vec![(b"user", b"app"), (b"database", b"shop")],
        };
        c.on_startup(&startup, 0, &mut out);
        assert_eq!(c.phase(), Phase::Authenticating);
        feed(&mut c, false, &frame(b'Z', b"I"), &mut out);
        assert_eq!(c.phase(), Phase::Ready);
        assert_eq!(&*c.meta.database, "shop");
        c
    }

    #[test]
    fn unnamed_and_named_entries_are_apart() {
        let mut n: Names<u32> = Names::default();
        assert_eq!(n.insert("", 1), None);
        assert_eq!(n.insert("S_1", 2), None);
        assert_eq!(n.get(""), Some(&1));
        assert_eq!(n.get("S_1"), Some(&2));
        assert!(!n.contains_key("S_2"));
        // A new unnamed one replaces the old, and only it.
        assert_eq!(n.insert(String::new(), 3), Some(1));
        *n.get_mut("S_1").unwrap() += 10;
        assert_eq!(n.values().copied().sum::<u32>(), 3 + 12);
        assert_eq!(n.remove(""), Some(3));
        assert_eq!(n.remove(""), None);
        assert_eq!(n.get("S_1"), Some(&12));
        n.insert("", 4);
        let mut all: Vec<u32> = n.drain().collect();
        all.sort();
        assert_eq!(all, [4, 12]);
        assert_eq!(n.values().count(), 0);
        n.insert("S_9", 5);
        n.clear();
        assert!(n.get("S_9").is_none() && n.get("").is_none());
    }

    #[test]
    fn a_repeated_row_description_shares_the_columns_and_a_changed_one_does_not() {
        let mut c = ready();
        let mut out = Vec::new();
        let mut columns_of_query = |c: &mut Conversation, cols: &[(&str, u32, i16, u32)]| {
            feed(c, true, &frame(b'Q', &cstr("select x from t")), &mut out);
            feed(c, false, &row_description(cols), &mut out);
            let got = c.last_columns.clone().expect("columns");
            feed(
                c,
                false,
                &[frame(b'C', &cstr("SELECT 0")), frame(b'Z', b"I")].concat(),
                &mut out,
            );
            got
        };
        let a = columns_of_query(&mut c, &[("x", 16400, 1, 23)]);
        let b = columns_of_query(&mut c, &[("x", 16400, 1, 23)]);
        assert!(Arc::ptr_eq(&a, &b));
        for other in [
            &[("y", 16400, 1, 23)][..],
            &[("x", 16401, 1, 23)],
            &[("x", 16400, 2, 23)],
            &[("x", 16400, 1, 25)],
            &[("x", 16400, 1, 23), ("z", 0, 0, 23)],
        ] {
            let d = columns_of_query(&mut c, other);
            assert!(!Arc::ptr_eq(&a, &d));
            assert_eq!(d.len(), other.len());
            assert_eq!(d[0].name, other[0].0);
            assert_eq!(
                (d[0].table_oid, d[0].column, d[0].type_oid),
                (other[0].1, other[0].2, other[0].3)
            );
        }
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn pending_requests_do_not_pile_up_over_many_transactions() {
        // pgbench -M prepared: Bind, Describe portal, Execute, Sync per statement.
        let mut c = ready();
        let mut out = Vec::new();
        let parse = [
            frame(b'P', &[cstr("P0_1"), cstr("select 1"), vec![0, 0]].concat()),
            frame(b'S', b""),
        ]
        .concat();
        feed(&mut c, true, &parse, &mut out);
        feed(
            &mut c,
            false,
            &[frame(b'1', b""), frame(b'Z', b"I")].concat(),
            &mut out,
        );
        for _ in 0..1000 {
            let client = [
                frame(
                    b'B',
                    &[cstr(""), cstr("P0_1"), vec![0, 0, 0, 0, 0, 0]].concat(),
                ),
                frame(b'D', b"P\0"),
                frame(b'E', b"\0\0\0\0\0"),
                frame(b'S', b""),
            ]
            .concat();
            feed(&mut c, true, &client, &mut out);
            let server = [
                frame(b'2', b""),
                row_description(&[("x", 0, 0, 23)]),
                frame(b'D', &[vec![0, 1, 0, 0, 0, 1], b"1".to_vec()].concat()),
                frame(b'C', b"SELECT 1\0"),
                frame(b'Z', b"I"),
            ]
            .concat();
            feed(&mut c, false, &server, &mut out);
        }
        assert_eq!(c.pending.len(), 0);
        assert!(c.portals.values().count() <= 1);
    }

    #[test]
    fn the_same_text_parsed_again_shares_its_analysis_and_another_does_not() {
        // libpq's extended protocol: Parse of the unnamed statement before each run.
        let mut c = ready();
        let mut out = Vec::new();
        let mut run = |c: &mut Conversation, sql: &str| {
            let client = [
                frame(b'P', &[cstr(""), cstr(sql), vec![0, 0]].concat()),
                frame(b'B', &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat()),
                portal_described_and_run(),
            ]
            .concat();
            feed(c, true, &client, &mut out);
            let parsed = c.statement("").expect("parsed").clone();
            let server = [
                parsed_and_bound(),
                row_description(&[("x", 0, 0, 23)]),
                frame(b'C', b"SELECT 1\0"),
                frame(b'Z', b"I"),
            ]
            .concat();
            feed(c, false, &server, &mut out);
            parsed
        };
        let a = run(&mut c, "select x from t where id = $1");
        let b = run(&mut c, "select x from t where id = $1");
        assert!(
            !Arc::ptr_eq(&a, &b),
            "a new statement (its own description)"
        );
        assert!(Arc::ptr_eq(&a.sql, &b.sql) && Arc::ptr_eq(&a.analysis, &b.analysis));
        for other in [
            "select x from t where id = $2",
            "select x from t where id = $",
            "select x from t where id = $1 ",
        ] {
            let d = run(&mut c, other);
            assert_eq!(&*d.sql, other);
            assert!(!Arc::ptr_eq(&a.sql, &d.sql));
        }
        // Every run recorded with its own text.
        let texts: Vec<String> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Statement(StatementOutcome {
                    text: StatementText::Known { sql, .. },
                    ..
                }) => Some(sql.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            texts,
            [
                "select x from t where id = $1",
                "select x from t where id = $1",
                "select x from t where id = $2",
                "select x from t where id = $",
                "select x from t where id = $1 ",
            ]
        );
        // Invalid UTF-8 is never shared as the text it was made into.
        let mut c = ready();
        let bad = [b"select '".as_slice(), &[0xff], b"'"].concat();
        for _ in 0..2 {
            let client = [
                frame(b'P', &[cstr(""), bad.clone(), vec![0], vec![0, 0]].concat()),
                frame(b'S', b""),
            ]
            .concat();
            feed(&mut c, true, &client, &mut out);
            assert_eq!(&*c.statement("").unwrap().sql, "select '\u{fffd}'");
        }
    }

    #[test]
    fn a_portal_described_in_the_same_batch_as_its_execute_has_its_columns() {
        // pgjdbc's plain Statement: Parse, Bind, Describe portal, Execute, Sync at once;
        // the rows arriving belong to columns the Describe answered after the Execute was
        // sent.
        let mut c = ready();
        let mut out = Vec::new();
        let mut client = frame(
            b'P',
            &[cstr(""), cstr("select email from users"), vec![0, 0]].concat(),
        );
        client.extend(frame(
            b'B',
            &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 1, 0, 1]].concat(),
        ));
        client.extend(frame(b'D', b"P\0"));
        client.extend(frame(b'E', b"\0\0\0\0\0"));
        client.extend(frame(
            b'B',
            &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        client.extend(frame(b'E', b"\0\0\0\0\0"));
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        let mut server = parsed_and_bound();
        server.extend(row_description(&[("email", 16384, 2, 25)]));
        feed(&mut c, false, &server, &mut out);
        let (_, columns) = c.rows_source().unwrap();
        let columns = columns.expect("the portal's columns");
        assert_eq!(
            columns
                .iter()
                .map(|c| (c.table_oid, c.column, c.format))
                .collect::<Vec<_>>(),
            vec![(16384, 2, 1)]
        );
        let mut server = frame(b'C', b"SELECT 0\0");
        server.extend(frame(b'2', b""));
        feed(&mut c, false, &server, &mut out);
        // The second portal runs the same statement: its columns, in its own formats.
        let (_, columns) = c.rows_source().unwrap();
        assert_eq!(
            columns
                .expect("from the statement")
                .iter()
                .map(|c| (c.column, c.format))
                .collect::<Vec<_>>(),
            vec![(2, 0)]
        );

        // pgjdbc past prepareThreshold: a named statement whose portal is described once,
        // then bound again (integers in binary) and executed without any Describe.
        let mut c = ready();
        let mut client = frame(
            b'P',
            &[cstr("S_1"), cstr("select id, email from users"), vec![0, 0]].concat(),
        );
        client.extend(frame(
            b'B',
            &[cstr(""), cstr("S_1"), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        client.extend(portal_described_and_run());
        feed(&mut c, true, &client, &mut out);
        let mut server = parsed_and_bound();
        server.extend(row_description(&[
            ("id", 16384, 1, 23),
            ("email", 16384, 2, 25),
        ]));
        server.extend(frame(b'C', b"SELECT 0\0"));
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        let mut client = frame(
            b'B',
            &[cstr(""), cstr("S_1"), vec![0, 0, 0, 0, 0, 2, 0, 1, 0, 0]].concat(),
        );
        client.extend(frame(b'E', b"\0\0\0\0\0"));
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        feed(&mut c, false, &frame(b'2', b""), &mut out);
        let (_, columns) = c.rows_source().unwrap();
        assert_eq!(
            columns
                .expect("the statement's columns, from its portal's description")
                .iter()
                .map(|c| (c.column, c.format))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 0)]
        );
    }

    #[test]
    fn a_statement_described_through_its_portal_holds_its_columns_in_text_format() {
        // Parse, Bind (results in `format`), Describe of the portal, Execute, Sync.
        let run = |format: i16| {
            let mut c = ready();
            let mut out = Vec::new();
            let mut client = frame(
                b'P',
                &[cstr(""), cstr("select id from t"), vec![0, 0]].concat(),
            );
            let results = [vec![0, 1], format.to_be_bytes().to_vec()].concat();
            client.extend(frame(
                b'B',
                &[cstr(""), cstr(""), vec![0, 0, 0, 0], results].concat(),
            ));
            client.extend(portal_described_and_run());
            feed(&mut c, true, &client, &mut out);
            let mut server = parsed_and_bound();
            server.extend(row_description_in(&[("id", 16384, 1, 23)], format));
            feed(&mut c, false, &server, &mut out);
            let portal = c.portal("").unwrap().columns.clone().unwrap();
            let statement = c.statement("").unwrap();
            let described = statement.description.get().unwrap().columns.clone();
            (portal, described.unwrap())
        };
        // In text already: the portal's columns, shared (no copy per statement).
        let (portal, described) = run(0);
        assert!(Arc::ptr_eq(&portal, &described));
        // In binary: the statement's copy says text (formats are chosen at each Bind).
        let (portal, described) = run(1);
        assert_eq!(portal[0].format, 1);
        assert_eq!(described[0].format, 0);
        assert_eq!(described[0].name, "id");
    }

    #[test]
    fn statement_described_once_serves_later_executes_without_describe() {
        // pgjdbc: Parse + Describe + Sync once, then Bind (binary results) + Execute only.
        let mut c = ready();
        let mut out = Vec::new();
        let mut client = frame(
            b'P',
            &[
                cstr("S_1"),
                cstr("select email, id from users where id = $1"),
                vec![0, 1, 0, 0, 0, 23],
            ]
            .concat(),
        );
        client.extend(frame(b'D', b"SS_1\0"));
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        let mut server = frame(b'1', b"");
        server.extend(frame(b't', b"\0\x01\0\0\0\x17"));
        server.extend(row_description(&[
            ("email", 16384, 2, 25),
            ("id", 16384, 1, 20),
        ]));
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        let s = c.statement("S_1").unwrap();
        let d = s.description.get().unwrap();
        assert_eq!(&*d.param_types, &[23]);
        assert_eq!(d.columns.as_ref().unwrap().len(), 2);

        let mut bind = [cstr(""), cstr("S_1")].concat();
        bind.extend([0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 1, 0, 1]); // one text param "7"; results binary
        let mut client = frame(b'B', &bind);
        feed(&mut c, true, &client, &mut out);
        // Before Execute is forwarded: which SQL, which columns, in which format.
        let (sql, columns) = c.execute_target("").unwrap();
        assert_eq!(&*sql, "select email, id from users where id = $1");
        let columns = columns.unwrap();
        assert_eq!(
            columns
                .iter()
                .map(|c| (c.name.as_str(), c.table_oid, c.column, c.format))
                .collect::<Vec<_>>(),
            vec![("email", 16384, 2, 1), ("id", 16384, 1, 1)]
        );
        client = frame(b'E', b"\0\0\0\0\0");
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        let mut server = frame(b'2', b"");
        server.extend(frame(
            b'D',
            b"\0\x02\0\0\0\x01a\0\0\0\x08\0\0\0\0\0\0\0\x07",
        ));
        server.extend(frame(b'C', b"SELECT 1\0"));
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        let statements: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Statement(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(statements.len(), 1);
        let s = statements[0];
        assert!(matches!(
            &s.result,
            StatementResult::Completed { rows: Some(1), .. }
        ));
        assert_eq!(&*s.prepared_name, "S_1");
        let params = s.params.as_ref().unwrap();
        assert_eq!(
            params.values().iter().collect::<Vec<_>>(),
            vec![Some(&b"7"[..])]
        );
        assert_eq!(c.counters.unmatched_responses, 0);
    }

    /// A Bind of the unnamed portal: `values` (None: NULL) in text, results in binary.
    fn bind_unnamed(values: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
        let mut b = [cstr(""), cstr("")].concat();
        b.extend(0u16.to_be_bytes());
        b.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend((-1i32).to_be_bytes()),
            }
        }
        b.extend((results.len() as u16).to_be_bytes());
        for r in results {
            b.extend(r.to_be_bytes());
        }
        let mut m = frame(b'B', &b);
        m.extend(frame(b'E', b"\0\0\0\0\0"));
        m
    }

    fn answered(n: usize) -> Vec<u8> {
        let mut server = Vec::new();
        for _ in 0..n {
            server.extend(frame(b'2', b""));
            server.extend(frame(b'C', b"SELECT 1\0"));
        }
        server.extend(frame(b'Z', b"I"));
        server
    }

    /// A statement's values (None: NULL) and result formats.
    type Bound = (Vec<Option<Vec<u8>>>, Vec<i16>);

    fn bound(out: &[Outcome]) -> Vec<Bound> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Statement(s) => s.params.as_ref(),
                _ => None,
            })
            .map(|p| {
                (
                    p.values().iter().map(|v| v.map(<[u8]>::to_vec)).collect(),
                    p.result_formats().iter().collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_bind_writes_over_the_buffer_of_the_one_before_only_when_nothing_holds_it() {
        let mut c = ready();
        let mut out = Vec::new();
        let mut client = frame(
            b'P',
            &[cstr(""), cstr("select $1, $2"), vec![0, 0]].concat(),
        );
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        feed(
            &mut c,
            false,
            &[frame(b'1', b""), frame(b'Z', b"I")].concat(),
            &mut out,
        );
        // One after another, each answered and its outcome dropped: each Bind writes over
        // the buffer of the one before, whatever the values' lengths; each statement has
        // its own values.
        type Run<'a> = (&'a [Option<&'a [u8]>], &'a [i16]);
        let runs: [Run<'_>; 4] = [
            (&[Some(b"12345"), Some(b"tenant-a")], &[1, 0]),
            (&[Some(b"7"), None], &[1]),
            (&[Some(&[b'x'; 40]), Some(b"")], &[]),
            (&[None, Some(b"9")], &[0, 1]),
        ];
        for (i, (values, results)) in runs.into_iter().enumerate() {
            out.clear();
            let mut client = bind_unnamed(values, results);
            client.extend(frame(b'S', b""));
            feed(&mut c, true, &client, &mut out);
            // Written over: past this Bind's bytes, those of the longer one before (a new
            // buffer's room is zeroed).
            let p = &c.portal("").unwrap().params;
            let over = p.raw()[p.end as usize..].iter().any(|b| *b != 0);
            assert_eq!(over, i == 1 || i == 3, "run {i}");
            feed(&mut c, false, &answered(1), &mut out);
            let expected: Vec<Option<Vec<u8>>> =
                values.iter().map(|v| v.map(<[u8]>::to_vec)).collect();
            assert_eq!(bound(&out), vec![(expected, results.to_vec())]);
        }
        // Pipelined: the first Execute still holds its buffer when the second Bind comes,
        // and its outcome has its own values (its event is made after the second Bind).
        out.clear();
        let mut client = bind_unnamed(&[Some(b"1"), Some(b"first")], &[1]);
        client.extend(bind_unnamed(&[Some(b"2"), Some(b"other")], &[0]));
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        feed(&mut c, false, &answered(2), &mut out);
        let one = |a: &[u8], b: &[u8]| vec![Some(a.to_vec()), Some(b.to_vec())];
        assert_eq!(
            bound(&out),
            vec![
                (one(b"1", b"first"), vec![1]),
                (one(b"2", b"other"), vec![0])
            ]
        );
        // An outcome kept (its event not yet recorded) keeps its buffer from the next Bind.
        let kept = std::mem::take(&mut out);
        let mut client = bind_unnamed(&[Some(b"3"), Some(b"third")], &[]);
        client.extend(frame(b'S', b""));
        feed(&mut c, true, &client, &mut out);
        feed(&mut c, false, &answered(1), &mut out);
        assert_eq!(bound(&out), vec![(one(b"3", b"third"), vec![])]);
        assert_eq!(bound(&kept)[1], (one(b"2", b"other"), vec![0]));
        assert_eq!(c.counters.unmatched_responses, 0);
    }

    /// (text, whole string if one of several, how it ended) of each statement outcome.
    fn simple_outcomes(out: &[Outcome]) -> Vec<(String, Option<String>, String)> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Statement(s) => Some(s),
                _ => None,
            })
            .map(|s| {
                let text = match &s.text {
                    StatementText::Known { sql, .. } => sql.to_string(),
                    other => format!("{other:?}"),
                };
                let end = match &s.result {
                    StatementResult::Completed { tag, .. } => tag.to_string(),
                    StatementResult::Failed { .. } => "failed".into(),
                    other => format!("{other:?}"),
                };
                (text, s.whole.as_ref().map(|w| w.to_string()), end)
            })
            .collect()
    }

    #[test]
    fn a_query_strings_statements_end_in_order_and_an_error_ends_the_rest() {
        let mut c = ready();
        let mut out = Vec::new();
        let one = |t: &str, w: Option<&str>, e: &str| {
            (t.to_string(), w.map(str::to_string), e.to_string())
        };
        // One statement: its text without the terminating semicolon, no whole string.
        feed(&mut c, true, &frame(b'Q', &cstr(" SELECT 1 ;; ")), &mut out);
        let mut server = frame(b'C', b"SELECT 1\0");
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        assert_eq!(simple_outcomes(&out), [one("SELECT 1", None, "SELECT 1")]);
        // Three: answered in order.
        out.clear();
        let three = "BEGIN; SELECT 2; COMMIT;";
        feed(&mut c, true, &frame(b'Q', &cstr(three)), &mut out);
        let mut server = frame(b'C', b"BEGIN\0");
        server.extend(frame(b'C', b"SELECT 1\0"));
        server.extend(frame(b'C', b"COMMIT\0"));
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        assert_eq!(
            simple_outcomes(&out),
            [
                one("BEGIN", Some(three), "BEGIN"),
                one("SELECT 2", Some(three), "SELECT 1"),
                one("COMMIT", Some(three), "COMMIT"),
            ]
        );
        // The second fails: the third never runs, and is not recorded.
        out.clear();
        let failing = "SELECT 3; SELECT nope; SELECT 4";
        feed(&mut c, true, &frame(b'Q', &cstr(failing)), &mut out);
        let mut server = frame(b'C', b"SELECT 1\0");
        server.extend(frame(
            b'E',
            &[cstr("SERROR"), cstr("C42703"), cstr("Mcolumn"), vec![0]].concat(),
        ));
        server.extend(frame(b'Z', b"I"));
        feed(&mut c, false, &server, &mut out);
        assert_eq!(
            simple_outcomes(&out),
            [
                one("SELECT 3", Some(failing), "SELECT 1"),
                one("SELECT nope", Some(failing), "failed"),
            ]
        );
        // The connection ends after the first answer: the others end unanswered, in order.
        out.clear();
        let cut = "SELECT 5; SELECT 6; SELECT 7";
        feed(&mut c, true, &frame(b'Q', &cstr(cut)), &mut out);
        feed(&mut c, false, &frame(b'C', b"SELECT 1\0"), &mut out);
        c.end_pending(StatementResult::NoResponse, 0, &mut out);
        assert_eq!(
            simple_outcomes(&out),
            [
                one("SELECT 5", Some(cut), "SELECT 1"),
                one("SELECT 6", Some(cut), "NoResponse"),
                one("SELECT 7", Some(cut), "NoResponse"),
            ]
        );
    }

    #[test]
    fn portal_described_and_simple_query_columns() {
        let mut c = ready();
        let mut out = Vec::new();
        let mut client = frame(
            b'P',
            &[cstr(""), cstr("select 1 as one"), vec![0, 0]].concat(),
        );
        client.extend(frame(
            b'B',
            &[cstr("p"), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        client.extend(frame(b'D', b"Pp\0"));
        feed(&mut c, true, &client, &mut out);
        let mut server = parsed_and_bound();
        server.extend(row_description(&[("one", 0, 0, 23)]));
        feed(&mut c, false, &server, &mut out);
        let (_, columns) = c.execute_target("p").unwrap();
        assert_eq!(columns.unwrap()[0].name, "one");
        assert_eq!(c.counters.unmatched_responses, 0);
        // A statement the conversation never saw prepared: no SQL to tell.
        assert!(c.execute_target("nope").is_none());
    }

    #[test]
    fn phases_through_encryption_and_termination() {
        let mut c = Conversation::new();
        let mut out = Vec::new();
        c.on_startup(&FrontendMessage::SslRequest, 0, &mut out);
        assert_eq!(c.phase(), Phase::NegotiatingEncryption { gss: false });
        c.on_encryption_reply(b'N');
        assert_eq!(c.phase(), Phase::Startup);
        c.on_startup(&FrontendMessage::GssEncRequest, 0, &mut out);
        c.on_encryption_reply(b'G');
        assert_eq!(c.phase(), Phase::Encrypted { gss: true });
        let mut c = Conversation::new();
        c.on_startup(&FrontendMessage::SslRequest, 0, &mut out);
        c.on_encryption_reply(b'S');
        assert_eq!(c.phase(), Phase::Encrypted { gss: false });
        assert!(c.meta.tls);
        c.begin_plaintext(true);
        assert_eq!(c.phase(), Phase::Startup);
        let mut c = ready();
        // A failed login keeps its error; the phase says startup never finished.
        let mut f = Conversation::new();
        f.on_startup(
            &FrontendMessage::Startup {
                protocol: crate::pg::PROTOCOL_3_0,
                params: vec![(b"user", b"x")],
            },
            0,
            &mut out,
        );
        feed(
            &mut f,
            false,
            &frame(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"),
            &mut out,
        );
        assert_eq!(f.startup_error.as_ref().unwrap().code, "28P01");
        assert_eq!(f.phase(), Phase::Authenticating);
        feed(&mut c, true, &frame(b'X', b""), &mut out);
        assert_eq!(c.phase(), Phase::Terminated);
    }
}
