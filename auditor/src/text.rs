//! Shared immutable text, lists and label sets: constants and values kept for the
//! process's life cost nothing to copy, others are reference-counted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Text of an event (or a statement, a session). Constants (kinds, protocols, capture
/// names, the empty string) are static and cost nothing to copy; text shared by many events
/// (identity, session, statement) is reference-counted, not copied, on the path of every
/// event.
///
/// Two words, where an enum of a `&'static str` and an `Arc<str>` takes three: an event
/// holds some thirty of them, and every event crosses from the decoding thread to the sink
/// thread and back (its box is reused), a cache line at a time. The pointer is the text's
/// first byte; the length's top bit says whether it is the data of an `Arc<str>` this
/// value holds one count of (no text is 2^63 bytes long).
pub struct Text {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

const SHARED: usize = 1 << (usize::BITS - 1);

/// Bytes [`Text::lasting`] keeps at most, its set's entries counted: a host sees a few
/// hundred users, databases, programs and units, a node a few thousand pods over weeks;
/// what comes past the bound is shared text as before, so the bound is only a cost.
/// Statement shapes ([`Text::lasting_shape`]) have four times as much.
pub const LASTING_BUDGET: usize = 4 << 20;

/// The longest value kept for the process's life.
const LASTING_MAX: usize = 1024;

/// What an entry of the set costs besides its bytes (the set's slot, the allocation).
const LASTING_ENTRY: usize = 48;

struct Lasting {
    kept: std::sync::Mutex<Kept<str>>,
    budget: usize,
}

/// What a pool keeps, and its cost so far (entries counted).
struct Kept<K: ?Sized + 'static> {
    texts: Option<std::collections::HashSet<&'static K>>,
    bytes: usize,
}

impl<K: ?Sized + 'static> Kept<K> {
    const fn new() -> Kept<K> {
        Kept {
            texts: None,
            bytes: 0,
        }
    }
}

/// Identity, then statement shapes.
static LASTING: [Lasting; 2] = [
    Lasting::new(LASTING_BUDGET),
    Lasting::new(4 * LASTING_BUDGET),
];

impl Lasting {
    const fn new(budget: usize) -> Lasting {
        Lasting {
            kept: std::sync::Mutex::new(Kept::new()),
            budget,
        }
    }

    fn keep(&self, s: &str) -> Text {
        if s.is_empty() {
            return Text::default();
        }
        if s.len() > LASTING_MAX {
            return Text::from(s);
        }
        match keep_in(&self.kept, self.budget, s, s.len() + LASTING_ENTRY, || {
            Box::leak(s.to_owned().into_boxed_str())
        }) {
            Some(k) => Text::Static(k),
            None => Text::from(s),
        }
    }
}

/// The value equal to `key` that `pool` keeps for the process's life, kept now (`leak`
/// makes it) if `cost` more bytes stay within `budget`; None past the bound.
fn keep_in<K: ?Sized + Eq + std::hash::Hash + 'static>(
    pool: &std::sync::Mutex<Kept<K>>,
    budget: usize,
    key: &K,
    cost: usize,
    leak: impl FnOnce() -> &'static K,
) -> Option<&'static K> {
    let mut kept = pool.lock().unwrap_or_else(|e| e.into_inner());
    let Kept { texts, bytes } = &mut *kept;
    let texts = texts.get_or_insert_with(Default::default);
    if let Some(k) = texts.get(key) {
        return Some(k);
    }
    if *bytes + cost > budget {
        return None;
    }
    let k = leak();
    *bytes += cost;
    texts.insert(k);
    Some(k)
}

// SAFETY: a Text is either a `&'static str` or an `Arc<str>`, both Send and Sync; it only
// reads its bytes and moves the Arc's count as the Arc would.
unsafe impl Send for Text {}
unsafe impl Sync for Text {}

#[allow(non_snake_case)]
impl Text {
    /// Static text: no count to keep.
    pub const fn Static(s: &'static str) -> Text {
        Text {
            // SAFETY: a reference's pointer is never null.
            ptr: unsafe { std::ptr::NonNull::new_unchecked(s.as_ptr() as *mut u8) },
            len: s.len(),
        }
    }

    /// Shared text: this value holds the Arc's count (given back when it is dropped).
    pub fn Shared(s: Arc<str>) -> Text {
        let len = s.len();
        let raw = Arc::into_raw(s) as *const u8 as *mut u8;
        Text {
            // SAFETY: `Arc::into_raw` never returns null.
            ptr: unsafe { std::ptr::NonNull::new_unchecked(raw) },
            len: len | SHARED,
        }
    }

    /// Text kept for the life of the process, for values that repeat on every event of
    /// a session and across sessions (names of users, databases, processes, units,
    /// addresses, policies): copying it costs no atomic count on the path of each event,
    /// where a shared text costs two (its clone and its drop, on a line another thread
    /// reads). Equal values are kept once. Kept text is bounded ([`LASTING_BUDGET`]); past
    /// the bound, or for a long value, the text is shared as [`Text::from`] shares it.
    pub fn lasting(s: &str) -> Text {
        LASTING[0].keep(s)
    }

    /// As [`Text::lasting`], for what the analysis of a statement's text makes of it (its
    /// normalised text, without literals, its command and fingerprint), with a bound of
    /// its own: a host's statements are many more than its users and programs, and do not
    /// crowd them out.
    pub fn lasting_shape(s: &str) -> Text {
        LASTING[1].keep(s)
    }

    fn is_shared(&self) -> bool {
        self.len & SHARED != 0
    }

    /// The text as a raw `str`; for a shared one, what `Arc::into_raw` gave.
    fn raw(&self) -> *const str {
        std::ptr::slice_from_raw_parts(self.ptr.as_ptr() as *const u8, self.len & !SHARED)
            as *const str
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: the bytes of a `&'static str`, or of an `Arc<str>` kept alive by the
        // count this value holds; UTF-8 either way.
        unsafe { &*self.raw() }
    }
}

impl Clone for Text {
    fn clone(&self) -> Self {
        if self.is_shared() {
            // SAFETY: `raw` came from `Arc::into_raw` and the Arc lives (this value holds
            // a count of it); the new value holds the new count.
            unsafe { Arc::increment_strong_count(self.raw()) };
        }
        Text {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for Text {
    fn drop(&mut self) {
        if self.is_shared() {
            // SAFETY: as in `clone`: gives back the count this value holds.
            unsafe { drop(Arc::from_raw(self.raw())) };
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::Static("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        if s.is_empty() {
            Text::default()
        } else {
            Text::Shared(Arc::from(s))
        }
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        if s.is_empty() {
            Text::default()
        } else {
            Text::Shared(Arc::from(s))
        }
    }
}

impl From<std::borrow::Cow<'_, str>> for Text {
    fn from(s: std::borrow::Cow<'_, str>) -> Self {
        Text::from(s.as_ref())
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Text::from)
    }
}

/// A list an event holds (the tables a statement touches, the columns a mask covered and
/// their counts), as [`Text`] holds text: an empty list or one kept for the process's life
/// is static and costs nothing to copy, another is an `Arc<[T]>` this value holds a count
/// of. An `Arc<[T]>` alone would move a count on every event's copy and drop, empty or not
/// (std's empty `Arc<[T]>` is one static count that every thread moves), on cache lines the
/// sink thread reads: a line passed between cores twice per event and field.
pub struct List<T: 'static> {
    ptr: std::ptr::NonNull<T>,
    /// The top bit says whether the elements are an `Arc<[T]>`'s.
    len: usize,
    _owns: std::marker::PhantomData<Arc<[T]>>,
}

// SAFETY: a List is either a `&'static [T]` or an `Arc<[T]>`, Send and Sync when `T` is
// both; it only reads its elements and moves the Arc's count as the Arc would.
unsafe impl<T: Send + Sync> Send for List<T> {}
unsafe impl<T: Send + Sync> Sync for List<T> {}

#[allow(non_snake_case)]
impl<T: 'static> List<T> {
    /// A static list: no count to keep.
    pub const fn Static(s: &'static [T]) -> List<T> {
        List {
            // SAFETY: a reference's pointer is never null.
            ptr: unsafe { std::ptr::NonNull::new_unchecked(s.as_ptr() as *mut T) },
            len: s.len(),
            _owns: std::marker::PhantomData,
        }
    }

    /// A shared list: this value holds the Arc's count (given back when it is dropped). An
    /// empty one is given back at once (the static empty list costs no count).
    pub fn Shared(s: Arc<[T]>) -> List<T> {
        if s.is_empty() {
            return List::Static(&[]);
        }
        let len = s.len();
        let raw = Arc::into_raw(s) as *const T as *mut T;
        List {
            // SAFETY: `Arc::into_raw` never returns null.
            ptr: unsafe { std::ptr::NonNull::new_unchecked(raw) },
            len: len | SHARED,
            _owns: std::marker::PhantomData,
        }
    }

    fn is_shared(&self) -> bool {
        self.len & SHARED != 0
    }

    /// The elements as a raw slice; for a shared list, what `Arc::into_raw` gave.
    fn raw(&self) -> *const [T] {
        std::ptr::slice_from_raw_parts(self.ptr.as_ptr() as *const T, self.len & !SHARED)
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the elements of a `&'static [T]`, or of an `Arc<[T]>` kept alive by the
        // count this value holds.
        unsafe { &*self.raw() }
    }
}

impl List<String> {
    /// As [`Text::lasting_shape`], for the tables of a statement's shape: kept for the
    /// process's life (equal lists once, bounded by [`LASTING_BUDGET`]), shared past the
    /// bound.
    pub fn lasting(items: Vec<String>) -> List<String> {
        static KEPT: std::sync::Mutex<Kept<[String]>> = std::sync::Mutex::new(Kept::new());
        if items.is_empty() {
            return List::default();
        }
        let cost = LASTING_ENTRY + items.iter().map(|s| s.len() + LASTING_ENTRY).sum::<usize>();
        match keep_in(&KEPT, LASTING_BUDGET, items.as_slice(), cost, || {
            Box::leak(items.clone().into_boxed_slice())
        }) {
            Some(k) => List::Static(k),
            None => List::from(items),
        }
    }
}

/// Workload labels, shared by the events of a session (and of other sessions of the
/// workload): kept for the process's life as [`Text::lasting`] keeps text, so that an
/// event's copy costs no count; shared past the bound.
#[derive(Clone)]
pub enum Labels {
    Static(&'static std::collections::BTreeMap<String, String>),
    Shared(Arc<std::collections::BTreeMap<String, String>>),
}

impl Labels {
    /// `labels`, the copy kept for the process's life if there is room for it.
    pub fn lasting(labels: std::collections::BTreeMap<String, String>) -> Labels {
        static KEPT: std::sync::Mutex<Kept<std::collections::BTreeMap<String, String>>> =
            std::sync::Mutex::new(Kept::new());
        if labels.is_empty() {
            return Labels::default();
        }
        let cost = LASTING_ENTRY
            + labels
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2 * LASTING_ENTRY)
                .sum::<usize>();
        match keep_in(&KEPT, LASTING_BUDGET, &labels, cost, || {
            Box::leak(Box::new(labels.clone()))
        }) {
            Some(k) => Labels::Static(k),
            None => Labels::Shared(Arc::new(labels)),
        }
    }
}

impl Default for Labels {
    fn default() -> Self {
        static NONE: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        Labels::Static(&NONE)
    }
}

impl From<std::collections::BTreeMap<String, String>> for Labels {
    fn from(labels: std::collections::BTreeMap<String, String>) -> Self {
        if labels.is_empty() {
            Labels::default()
        } else {
            Labels::Shared(Arc::new(labels))
        }
    }
}

impl std::ops::Deref for Labels {
    type Target = std::collections::BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        match self {
            Labels::Static(l) => l,
            Labels::Shared(l) => l,
        }
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        // The same map (a session's events share theirs) without comparing its strings.
        std::ptr::eq::<std::collections::BTreeMap<String, String>>(&**self, &**other)
            || **self == **other
    }
}

impl Eq for Labels {}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        std::collections::BTreeMap::deserialize(d).map(Labels::from)
    }
}

impl<T: 'static> Clone for List<T> {
    fn clone(&self) -> Self {
        if self.is_shared() {
            // SAFETY: `raw` came from `Arc::into_raw` and the Arc lives (this value holds
            // a count of it); the new value holds the new count.
            unsafe { Arc::increment_strong_count(self.raw()) };
        }
        List {
            ptr: self.ptr,
            len: self.len,
            _owns: std::marker::PhantomData,
        }
    }
}

impl<T: 'static> Drop for List<T> {
    fn drop(&mut self) {
        if self.is_shared() {
            // SAFETY: as in `clone`: gives back the count this value holds.
            unsafe { drop(Arc::from_raw(self.raw())) };
        }
    }
}

impl<T: 'static> Default for List<T> {
    fn default() -> Self {
        List::Static(&[])
    }
}

impl<T: 'static> std::ops::Deref for List<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: 'static> From<Vec<T>> for List<T> {
    fn from(v: Vec<T>) -> Self {
        List::Shared(Arc::from(v))
    }
}

impl<T: Clone + 'static> From<&[T]> for List<T> {
    fn from(v: &[T]) -> Self {
        List::Shared(Arc::from(v))
    }
}

impl<T: 'static> FromIterator<T> for List<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        List::from(iter.into_iter().collect::<Vec<T>>())
    }
}

impl<T: PartialEq + 'static> PartialEq for List<T> {
    fn eq(&self, other: &Self) -> bool {
        // The same list (an empty one, or one the events of a shape share) without
        // comparing its elements: slices of plain values compare with `memcmp`, which
        // costs a fault-suppression assist on an empty list's dangling pointer (see
        // `same_bytes`).
        if self.len() != other.len() {
            return false;
        }
        self.is_empty() || self.as_ptr() == other.as_ptr() || self.as_slice() == other.as_slice()
    }
}

impl<T: Eq + 'static> Eq for List<T> {}

impl<T: std::fmt::Debug + 'static> std::fmt::Debug for List<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl<T: Serialize + 'static> Serialize for List<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de, T: Deserialize<'de> + 'static> Deserialize<'de> for List<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(List::from)
    }
}

/// A short string kept inline (no allocation) up to 30 bytes, a longer one boxed: a
/// command tag ("SELECT 1", "INSERT 0 1") on the path of every statement.
#[derive(Clone, PartialEq, Eq)]
pub enum ShortText {
    Inline { len: u8, bytes: [u8; 30] },
    Boxed(Box<str>),
}

impl ShortText {
    pub fn new(s: &str) -> Self {
        let mut bytes = [0u8; 30];
        match bytes.get_mut(..s.len()) {
            Some(head) => {
                head.copy_from_slice(s.as_bytes());
                ShortText::Inline {
                    len: s.len() as u8,
                    bytes,
                }
            }
            None => ShortText::Boxed(s.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // The bytes are a whole &str's: valid UTF-8.
            ShortText::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default()
            }
            ShortText::Boxed(s) => s,
        }
    }
}

impl std::ops::Deref for ShortText {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for ShortText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Labels, List, ShortText, Text};

    /// Equal values are kept once and copied without a count; past the bound (and for a
    /// long value) text is shared as before, and what was kept stays kept.
    #[test]
    fn lasting_text_is_kept_once_and_bounded() {
        let a = Text::lasting("lasting-test-user");
        let b = Text::lasting(&String::from("lasting-test-user"));
        assert!(!a.is_shared());
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        assert!(!Text::lasting("").is_shared());
        assert!(Text::lasting(&"x".repeat(super::LASTING_MAX + 1)).is_shared());
        // Filled to its bound (other tests of this process may have kept some already).
        let mut i = 0u64;
        loop {
            let t = Text::lasting(&format!("{i:01000}"));
            if t.is_shared() {
                assert_eq!(&*t, format!("{i:01000}"));
                break;
            }
            i += 1;
            assert!(
                i < (super::LASTING_BUDGET / 1000) as u64 + 1,
                "never bounded"
            );
        }
        let again = Text::lasting("lasting-test-user");
        assert!(!again.is_shared());
        assert_eq!(again.as_str().as_ptr(), a.as_str().as_ptr());
        assert!(Text::lasting("a value first seen past the bound").is_shared());
    }

    #[test]
    fn short_text_inline_and_boxed() {
        for s in [
            "",
            "SELECT 1",
            "INSERT 0 1",
            &"é".repeat(15),
            &"x".repeat(31),
        ] {
            let t = ShortText::new(s);
            assert_eq!(t.as_str(), s);
            assert_eq!(matches!(t, ShortText::Inline { .. }), s.len() <= 30);
        }
    }

    #[test]
    fn text_is_two_words_and_keeps_the_arc_count() {
        assert_eq!(std::mem::size_of::<Text>(), 16);
        assert_eq!(std::mem::size_of::<Option<Text>>(), 16);
        let arc: Arc<str> = Arc::from("pgbench");
        let t = Text::Shared(arc.clone());
        assert_eq!(Arc::strong_count(&arc), 2);
        let copies: Vec<Text> = (0..3).map(|_| t.clone()).collect();
        assert_eq!(Arc::strong_count(&arc), 5);
        assert!(copies
            .iter()
            .all(|c| c == "pgbench" && c.as_ptr() == arc.as_ptr()));
        drop(copies);
        drop(t);
        assert_eq!(Arc::strong_count(&arc), 1);
        for t in [
            Text::Static(""),
            Text::Static("SELECT"),
            Text::from(""),
            Text::default(),
        ] {
            let c = t.clone();
            assert_eq!(c.as_str(), t.as_str());
        }
        assert_eq!(Text::from("é".repeat(3)).as_str(), "ééé");
        assert_eq!(Text::from(String::new()), Text::Static(""));
    }

    #[test]
    fn list_is_two_words_keeps_the_arc_count_and_empty_costs_none() {
        assert_eq!(std::mem::size_of::<List<String>>(), 16);
        let arc: Arc<[u64]> = Arc::from(vec![3, 4]);
        let l = List::Shared(arc.clone());
        assert_eq!(Arc::strong_count(&arc), 2);
        let copies: Vec<List<u64>> = (0..3).map(|_| l.clone()).collect();
        assert_eq!(Arc::strong_count(&arc), 5);
        assert!(copies.iter().all(|c| c[..] == [3, 4]));
        drop(copies);
        drop(l);
        assert_eq!(Arc::strong_count(&arc), 1);
        // Empty lists hold no count, whichever way they are made.
        for l in [
            List::<String>::default(),
            List::from(Vec::new()),
            List::Shared(Arc::from(Vec::new())),
            List::lasting(Vec::new()),
        ] {
            assert!(!l.is_shared() && l.is_empty());
            assert!(!l.clone().is_shared());
        }
        let json = serde_json::to_string(&List::from(vec!["a".to_string()])).unwrap();
        assert_eq!(json, r#"["a"]"#);
        let back: List<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[..], ["a".to_string()]);
    }

    /// Equal table lists are kept once, static (no count to move per event).
    #[test]
    fn lasting_lists_are_kept_once() {
        let a = List::lasting(vec!["lasting_list_test".to_string(), "b".to_string()]);
        let b = List::lasting(vec!["lasting_list_test".to_string(), "b".to_string()]);
        assert!(!a.is_shared());
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(a, b);
        assert_eq!(a[..], ["lasting_list_test".to_string(), "b".to_string()]);
    }

    /// Equal label sets are kept once and compared by address; an empty set is the
    /// static one; `from` shares without keeping.
    #[test]
    fn lasting_labels_are_kept_once() {
        let map = |v: &str| {
            std::collections::BTreeMap::from([
                ("k8s.pod/app".to_string(), v.to_string()),
                (
                    "process.comm".to_string(),
                    "lasting-labels-test".to_string(),
                ),
            ])
        };
        let a = Labels::lasting(map("web"));
        let b = Labels::lasting(map("web"));
        assert!(matches!((&a, &b), (Labels::Static(x), Labels::Static(y)) if std::ptr::eq(*x, *y)));
        assert_eq!(a, b);
        assert_ne!(a, Labels::lasting(map("api")));
        assert_eq!(a.get("k8s.pod/app").map(String::as_str), Some("web"));
        assert!(matches!(Labels::lasting(Default::default()), Labels::Static(m) if m.is_empty()));
        assert!(matches!(Labels::from(map("web")), Labels::Shared(_)));
        assert_eq!(Labels::from(map("web")), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"k8s.pod/app":"web","process.comm":"lasting-labels-test"}"#
        );
        assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), a);
    }
}
