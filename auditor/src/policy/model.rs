//! The policy file format: what a YAML file in the policies directory may say. These types
//! are the format's only definition: the daemon reads them, `auditor policy lint` checks
//! them, and `policies/schema.json` (for editors) is generated from them.
//!
//! Values that can be wrong in ways YAML cannot express (an operator's values, a CIDR, a
//! regex, a duration) are checked while the file is read, so that every error carries the
//! line and column of the value at fault.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One policy: which workloads it selects, in which mode, what is recorded of their
/// statements, and the rules enforcement (or a dry run) applies to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique among the policies of a directory; events name it.
    pub name: String,
    /// What the policy is for, for the people who read it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Breaks ties between policies whose selectors are equally specific: higher first.
    #[serde(default)]
    pub priority: i32,
    /// The sessions the policy applies to. An empty selector selects every session.
    #[serde(default)]
    pub selector: Selector,
    /// `audit` (record only), `dry-run` (record what the rules would do) or `enforce`.
    /// Unset: taken from the next matching policy, finally `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// What is recorded of statements. Each switch left unset is taken from the next
    /// matching policy, finally from the daemon's `record` configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
    /// What a rule-bearing policy does with a statement the SQL parser cannot read (and so
    /// cannot judge): `block` (default: fail closed) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unparsable: Option<Unparsable>,
    /// Statements refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<BlockRule>,
    /// Columns whose values are hidden from the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<MaskRule>,
    /// Statements held until a person approves them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_approval: Vec<ApprovalRule>,
    /// The proxy logs in to Postgres for the workload with this credential (`enforce`
    /// policies only): the workload connects with any user name and no password, and
    /// never holds the database's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Credential>,
}

/// A database login the proxy holds for a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The role the proxy logs in as (the client's user name is replaced by it).
    pub user: String,
    /// A file holding the role's password (its first line). Read at each new session: a
    /// rotated file is used from the next session on; open sessions are not disturbed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
    /// A Kubernetes Secret holding the role's password, read through the API server
    /// (watched: a rotated Secret is used from the next session on). Needs
    /// `kubernetes.enabled` and RBAC to get, list and watch that Secret. One of
    /// `password_file` and `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
}

/// A key of a Kubernetes Secret.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
    /// The key in the Secret's data. Default: `password`.
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_secret_key() -> String {
    "password".into()
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {}/{} (key {})",
            self.namespace, self.name, self.key
        )
    }
}

impl Credential {
    /// Where the password comes from, for messages (never the password).
    pub fn source(&self) -> String {
        match (&self.password_file, &self.secret) {
            (Some(f), _) => f.display().to_string(),
            (None, Some(s)) => s.to_string(),
            (None, None) => "no password source".into(),
        }
    }
}

impl Policy {
    /// Whether the policy has rules to judge statements by.
    pub fn has_rules(&self) -> bool {
        !self.block.is_empty() || !self.mask.is_empty() || !self.require_approval.is_empty()
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Record every statement; rules are not evaluated.
    Audit,
    /// Record every statement and what the rules would have done (`would_block`,
    /// `would_mask`, `would_hold`), without acting.
    DryRun,
    /// Act on the rules: the workload's connections go through the inline proxy. Where
    /// the proxy is not running, decisions are recorded as in a dry run.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Unparsable {
    Block,
    Allow,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Keep statement text as sent, literals included (default: literals become $n).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_statements: Option<bool>,
    /// Keep bind parameter values as sent (default: keyed hashes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_params: Option<bool>,
}

/// A Kubernetes-style label selector over the session's labels: the workload's (pod,
/// namespace, service account, systemd unit, container, process, host) and the
/// connection's (`db.user`, `db.name`, `db.application_name`, `client.addr`,
/// `server.addr`, `server.port`). Every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Label key -> exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// How many requirements it makes: more is more specific.
    pub fn specificity(&self) -> usize {
        self.match_labels.len() + self.match_expressions.len()
    }
}

/// `key` `operator` `values`. For `client.addr` and `server.addr`, values of `In` and
/// `NotIn` are addresses or CIDR blocks (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawRequirement")]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// The values of an address key, parsed.
    #[serde(skip)]
    #[schemars(skip)]
    pub nets: Vec<Cidr>,
}

/// `key` `operator` `values` (the schema of [`Requirement`]).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    /// A label key: `k8s.namespace`, `k8s.pod/app`, `db.user`, `client.addr`, ...
    key: String,
    operator: Operator,
    /// For `In` and `NotIn` (at least one); none for `Exists` and `DoesNotExist`.
    #[serde(default)]
    values: Vec<String>,
}

/// Keys whose values are addresses: selectors match them by CIDR block.
pub const ADDRESS_KEYS: [&str; 2] = ["client.addr", "server.addr"];

impl TryFrom<RawRequirement> for Requirement {
    type Error = String;
    fn try_from(r: RawRequirement) -> Result<Self, String> {
        match r.operator {
            Operator::In | Operator::NotIn if r.values.is_empty() => {
                return Err(format!(
                    "`{}` on `{}` needs at least one value in `values`",
                    r.operator.as_str(),
                    r.key
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                return Err(format!(
                    "`{}` on `{}` takes no `values`",
                    r.operator.as_str(),
                    r.key
                ))
            }
            _ => {}
        }
        let nets = if ADDRESS_KEYS.contains(&r.key.as_str()) {
            r.values
                .iter()
                .map(|v| v.parse::<Cidr>())
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        Ok(Requirement {
            key: r.key,
            operator: r.operator,
            values: r.values,
            nets,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

/// An address block: `10.0.0.0/8`, `192.168.1.7` (a /32), `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an address or CIDR block (like 10.0.0.0/8 or ::1)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen on an IPv6 socket (::ffff:a.b.c.d) is that IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which statements a rule is about. Every condition given must hold; a list holds when
/// any of its entries does. Judged on the parse tree of every statement of the query
/// string, sub-selects, CTEs and EXPLAIN'd statements included.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Commands, as events name them: `SELECT`, `DELETE`, `CREATE TABLE`, `COPY`, ...
    /// A command anywhere in the statement counts (`DELETE` in a CTE is a DELETE).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Tables touched: `schema.table`, `schema.*`, or `table` (in any schema). An
    /// unqualified table in a statement is taken to be in every schema (fail closed).
    /// Double quotes keep case and dots: `"Billing"."Card Numbers"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<NamePattern>,
    /// Functions called: `pg_read_file`, `lo_export`, `dblink*` (a trailing `*` matches
    /// any suffix), `pg_catalog.pg_ls_dir`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<NamePattern>,
    /// Schema changes: CREATE, ALTER, DROP, TRUNCATE, GRANT, REVOKE, COMMENT, ...
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ddl: bool,
    /// UPDATE or DELETE without a WHERE clause.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_where: bool,
    /// `COPY ... TO PROGRAM` or `FROM PROGRAM` (runs a shell command on the server).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_program: bool,
    /// A query string holding more than one statement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_statement: bool,
    /// Statements whose effect the parse tree does not show: DO blocks, CALL, SQL-level
    /// EXECUTE of a prepared statement, function calls by the FunctionCall message, and
    /// built-in functions that run SQL given as text or read a relation named by a value
    /// (query_to_xml, table_to_xml, cursor_to_xml and the like, dblink).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque: bool,
    /// A regular expression over the statement's text as sent (last resort: text rules
    /// miss what parse-tree rules catch). `(?i)` makes it case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<Pattern>,
}

impl When {
    pub fn is_empty(&self) -> bool {
        *self == When::default()
    }
}

/// A name, optionally schema-qualified, with a trailing `*` matching any suffix.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(transparent)]
pub struct NamePattern {
    pub text: String,
    /// The schema part, if any (unquoted parts folded to lower case, as Postgres does).
    #[schemars(skip)]
    pub schema: Option<String>,
    #[schemars(skip)]
    pub name: String,
}

impl NamePattern {
    pub fn parse(text: &str) -> Result<NamePattern, String> {
        let parts = split_identifier(text)
            .ok_or_else(|| format!("`{text}` is not a name (unbalanced double quote?)"))?;
        let (schema, name) = match parts.as_slice() {
            [name] => (None, name.clone()),
            [schema, name] => (Some(schema.clone()), name.clone()),
            _ => {
                return Err(format!(
                    "`{text}`: expected `name` or `schema.name` (quote names holding dots)"
                ))
            }
        };
        if name.is_empty() || schema.as_deref() == Some("") {
            return Err(format!("`{text}`: an empty name"));
        }
        Ok(NamePattern {
            text: text.to_string(),
            schema,
            name,
        })
    }

    /// Whether `schema.name` (schema empty when the statement did not say) matches.
    pub fn matches(&self, schema: &str, name: &str) -> bool {
        let schema_ok = match &self.schema {
            None => true,
            // An unqualified name may resolve to any schema on the search path.
            Some(_) if schema.is_empty() => true,
            Some(s) => glob(s, schema),
        };
        schema_ok && glob(&self.name, name)
    }
}

/// `*` at the end matches any suffix; a lone `*` matches everything.
pub(crate) fn glob(pattern: &str, s: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => s.starts_with(prefix),
        None => pattern == s,
    }
}

/// Splits `a.b`, `"A"."b.c"`, folding unquoted parts to lower case. None on a stray quote.
pub fn split_identifier(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.trim().chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c if quoted => cur.push(c),
            c => cur.extend(c.to_lowercase()),
        }
    }
    if quoted {
        return None;
    }
    parts.push(cur);
    Some(parts)
}

impl Serialize for NamePattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        NamePattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A compiled regular expression.
#[derive(Debug, Clone, JsonSchema)]
#[schemars(transparent)]
pub struct Pattern {
    #[schemars(with = "String")]
    pub regex: regex::Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.regex.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        regex::RegexBuilder::new(&text)
            .size_limit(1 << 20)
            .build()
            .map(|regex| Pattern { regex })
            .map_err(|e| serde::de::Error::custom(format!("`pattern` does not compile: {e}")))
    }
}

/// Refuses the statements it is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawBlock")]
pub struct BlockRule {
    /// Names the rule in events and `policy explain`.
    pub name: String,
    pub when: When,
    /// What the client is told (the proxy's error message); a default names the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Refuses the statements it is about (the schema of [`BlockRule`]).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    /// Names the rule in events and `policy explain`.
    name: String,
    /// Which statements (at least one condition).
    when: When,
    /// What the client is told (the proxy's error message); a default names the rule.
    #[serde(default)]
    message: Option<String>,
}

fn check_when(rule: &str, when: &When) -> Result<(), String> {
    if when.is_empty() {
        return Err(format!(
            "rule `{rule}`: `when` names no condition (to match every statement, say `pattern: \"\"`)"
        ));
    }
    Ok(())
}

impl TryFrom<RawBlock> for BlockRule {
    type Error = String;
    fn try_from(r: RawBlock) -> Result<Self, String> {
        check_when(&r.name, &r.when)?;
        Ok(BlockRule {
            name: r.name,
            when: r.when,
            message: r.message,
        })
    }
}

/// Hides the values of columns from the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    pub name: String,
    /// Columns: `table.column`, `schema.table.column` (`*` ends a name as in `tables`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnPattern>,
    /// Values recognised by their content, inside any text value (in the `columns` named,
    /// or in every column when none are): each one found is masked, the rest of the value
    /// kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detectors: Vec<Detector>,
    /// Regular expressions (Rust `regex` syntax) of the installation's own sensitive
    /// values, found like `detectors`: `ACCT-[0-9]{8}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// How values are masked. Default: `redact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub using: Option<MaskUsing>,
    /// With `using: partial`: how many trailing characters (or digits) stay (at most half
    /// of a value). Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u8>,
    /// A statement that runs code whose results the proxy cannot follow (a DO block,
    /// CALL, a user-defined function) in a session that reads masked data: `block` it
    /// (the default), or run it and `mask` its computed columns whole. (Expressions over
    /// masked columns are followed: their columns are masked whole either way.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unknown: Option<OnUnknownLineage>,
}

/// How a mask rule rewrites values. Text-like columns get the text; integer columns an
/// integer; other types NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaskUsing {
    /// A fixed `****` (integers: 0).
    Redact,
    /// All but the last `keep` characters replaced by `*` (integers: the last digits).
    Partial,
    /// A keyed hash, the key per installation: equal values mask equally, so joins and
    /// GROUP BY still work (integers: a hash in the type's range).
    Hash,
    /// NULL, whatever the type.
    Null,
    /// Format-preserving e-mail: `<hash>@masked.invalid` (consistent like `hash`).
    Email,
}

/// What a mask rule does with result columns it cannot tie to their source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknownLineage {
    Block,
    Mask,
}

/// A masking function as applied (from `using` and `keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskFunction {
    Redact,
    Partial { keep: u8 },
    Hash,
    Null,
    Email,
}

impl MaskRule {
    pub fn function(&self) -> MaskFunction {
        match self.using.unwrap_or(MaskUsing::Redact) {
            MaskUsing::Redact => MaskFunction::Redact,
            MaskUsing::Partial => MaskFunction::Partial {
                keep: self.keep.unwrap_or(4),
            },
            MaskUsing::Hash => MaskFunction::Hash,
            MaskUsing::Null => MaskFunction::Null,
            MaskUsing::Email => MaskFunction::Email,
        }
    }

    pub fn blocks_unknown(&self) -> bool {
        self.on_unknown != Some(OnUnknownLineage::Mask)
    }
}

/// `table.column` or `schema.table.column`.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(transparent)]
pub struct ColumnPattern {
    pub text: String,
    #[schemars(skip)]
    pub table: NamePattern,
    #[schemars(skip)]
    pub column: String,
}

impl<'de> Deserialize<'de> for ColumnPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parts = split_identifier(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("`{text}` is not a column (unbalanced quote?)"))
        })?;
        let n = parts.len();
        if !(2..=3).contains(&n) || parts.iter().any(|p| p.is_empty()) {
            return Err(serde::de::Error::custom(format!(
                "`{text}`: expected `table.column` or `schema.table.column`"
            )));
        }
        let table = NamePattern {
            text: text.clone(),
            schema: (n == 3).then(|| parts[0].clone()),
            name: parts[n - 2].clone(),
        };
        Ok(ColumnPattern {
            column: parts[n - 1].clone(),
            table,
            text,
        })
    }
}

impl Serialize for ColumnPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// Payment card numbers (13-19 digits passing the Luhn check).
    CardNumber,
    /// US social security numbers (123-45-6789).
    UsSsn,
    /// IBANs (with their check digits).
    Iban,
    /// Phone numbers: international (`+` and 8 to 15 digits) or North American
    /// (`(555) 123-4567`, `555-123-4567`).
    Phone,
}

/// Holds the statements it is about until a person approves them (or the timeout denies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawApproval")]
pub struct ApprovalRule {
    pub name: String,
    pub when: When,
    /// Who may approve: local user names or `group:NAME` (the `auditor approvals` CLI),
    /// `oidc:NAME` or `oidc-group:NAME` (the web console's signed-in users). Empty: anyone
    /// with access to the approval socket or the console.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// How long a statement waits before it is denied: `90s`, `5m`, `1h`. Default: 5m.
    #[serde(default = "default_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(300)
}

/// Holds the statements it is about until a person approves them (the schema of
/// [`ApprovalRule`]).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawApproval {
    /// Names the rule in events, the approval queue and `policy explain`.
    name: String,
    /// Which statements (at least one condition).
    when: When,
    /// Who may approve: local user names or `group:NAME` (the `auditor approvals` CLI),
    /// `oidc:NAME` or `oidc-group:NAME` (the web console's signed-in users). Empty: anyone
    /// with access to the approval socket or the console.
    #[serde(default)]
    approvers: Vec<String>,
    /// How long a statement waits before it is denied: `90s`, `5m`, `1h`. Default: 5m.
    #[serde(default = "default_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    timeout: Duration,
}

impl TryFrom<RawApproval> for ApprovalRule {
    type Error = String;
    fn try_from(r: RawApproval) -> Result<Self, String> {
        check_when(&r.name, &r.when)?;
        if r.timeout.is_zero() {
            return Err(format!("rule `{}`: `timeout` must be more than 0", r.name));
        }
        for a in &r.approvers {
            let name = ["group:", "oidc:", "oidc-group:"]
                .iter()
                .find_map(|p| a.strip_prefix(p))
                .unwrap_or(a);
            if name.trim().is_empty() || name.trim() != name {
                return Err(format!(
                    "rule `{}`: approver `{a}` is not a user name, group:NAME, oidc:NAME or \
                     oidc-group:NAME",
                    r.name
                ));
            }
            if let Some((prefix, _)) = a.split_once(':') {
                if !["group", "oidc", "oidc-group"].contains(&prefix) {
                    return Err(format!(
                        "rule `{}`: approver `{a}`: `{prefix}:` is not group:, oidc: or \
                         oidc-group:",
                        r.name
                    ));
                }
            }
        }
        Ok(ApprovalRule {
            name: r.name,
            when: r.when,
            approvers: r.approvers,
            timeout: r.timeout,
        })
    }
}

/// Durations written `90s`, `5m`, `2h`, `1d`.
pub mod duration_text {
    use std::time::Duration;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}`: give a unit (s, m, h or d), as in `5m`"))?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like `90s`, `5m`, `2h`"))?;
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            _ => return Err(format!("`{s}`: unknown unit `{unit}` (s, m, h or d)")),
        };
        Ok(Duration::from_secs(secs))
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.9.9.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0", "x/8", "::1/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn name_patterns() {
        let p = |t: &str| NamePattern::parse(t).unwrap();
        assert!(p("users").matches("public", "users"));
        assert!(p("users").matches("", "users"));
        assert!(p("users").matches("crm", "users"));
        assert!(!p("users").matches("public", "users2"));
        assert!(p("public.users").matches("", "users"));
        assert!(!p("public.users").matches("crm", "users"));
        assert!(p("crm.*").matches("crm", "anything"));
        assert!(!p("crm.*").matches("public", "anything"));
        assert!(p("dblink*").matches("", "dblink_exec"));
        assert!(p("PUBLIC.Users").matches("public", "users"));
        assert!(!p("\"Users\"").matches("public", "users"));
        assert!(p("\"Users\"").matches("public", "Users"));
        assert!(p("\"a.b\".\"C d\"").matches("a.b", "C d"));
        assert!(NamePattern::parse("a.b.c").is_err());
        assert!(NamePattern::parse("\"a").is_err());
        assert!(NamePattern::parse("a.").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration_text::parse("90s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            duration_text::parse("5m").unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(
            duration_text::parse("1d").unwrap(),
            Duration::from_secs(86400)
        );
        assert!(duration_text::parse("5").is_err());
        assert!(duration_text::parse("5w").is_err());
        assert!(duration_text::parse("m").is_err());
    }
}
