//! Shared immutable text: constants cost nothing to copy, other text is reference-counted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Text of an event (or a statement, a session). Constants (kinds, protocols, capture names, the empty string) are
/// static and cost nothing to copy; text shared by many events (identity, session,
/// statement) is reference-counted, not copied, on the path of every event.
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
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
mod short_tests {
    use super::ShortText;

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
}
