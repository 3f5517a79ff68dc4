//! The symbol name as it travels in frames: inline, fixed-size, upper-case ASCII.
//!
//! Fixed size keeps every archived body fixed-size (no relative pointers), so the archived size of
//! a frame is known before it is written. Names are 1–24 bytes of `A-Z 0-9`, NUL-padded.

use std::fmt;

/// Longest accepted symbol name in bytes.
pub const SYMBOL_MAX_LEN: usize = 24;

/// Why a symbol name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SymbolError {
    #[error("empty symbol")]
    Empty,
    #[error("symbol longer than 24 bytes")]
    TooLong,
    #[error("symbol byte {0} is not A-Z or 0-9")]
    InvalidByte(usize),
}

/// A validated symbol name, e.g. `BTCUSDT`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub struct Symbol {
    bytes: [u8; SYMBOL_MAX_LEN],
}

impl Symbol {
    /// Validates and upper-cases `name` (`btcusdt` → `BTCUSDT`).
    pub fn new(name: &str) -> Result<Symbol, SymbolError> {
        let b = name.as_bytes();
        if b.is_empty() {
            return Err(SymbolError::Empty);
        }
        if b.len() > SYMBOL_MAX_LEN {
            return Err(SymbolError::TooLong);
        }
        let mut bytes = [0u8; SYMBOL_MAX_LEN];
        for (i, (&c, slot)) in b.iter().zip(bytes.iter_mut()).enumerate() {
            let up = c.to_ascii_uppercase();
            if !(up.is_ascii_uppercase() || up.is_ascii_digit()) {
                return Err(SymbolError::InvalidByte(i));
            }
            *slot = up;
        }
        Ok(Symbol { bytes })
    }

    /// Validates raw bytes read from the wire.
    pub fn from_wire(bytes: &[u8; SYMBOL_MAX_LEN]) -> Result<Symbol, SymbolError> {
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(SYMBOL_MAX_LEN);
        if len == 0 {
            return Err(SymbolError::Empty);
        }
        for (i, &c) in bytes.iter().enumerate() {
            let ok = if i < len { c.is_ascii_uppercase() || c.is_ascii_digit() } else { c == 0 };
            if !ok {
                return Err(SymbolError::InvalidByte(i));
            }
        }
        Ok(Symbol { bytes: *bytes })
    }

    pub fn as_str(&self) -> &str {
        let len = self.bytes.iter().position(|&b| b == 0).unwrap_or(SYMBOL_MAX_LEN);
        // Invariant: constructors admit only ASCII, so any prefix is valid UTF-8.
        std::str::from_utf8(&self.bytes[..len]).unwrap_or("")
    }

    pub fn as_bytes(&self) -> &[u8; SYMBOL_MAX_LEN] {
        &self.bytes
    }
}

impl ArchivedSymbol {
    /// The raw padded bytes as archived (not yet validated as a name).
    pub fn raw(&self) -> &[u8; SYMBOL_MAX_LEN] {
        &self.bytes
    }

    /// Validates the archived bytes as a symbol name.
    pub fn to_symbol(&self) -> Result<Symbol, SymbolError> {
        Symbol::from_wire(&self.bytes)
    }
}

impl fmt::Debug for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Symbol({})", self.as_str())
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Symbol {
    type Err = SymbolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Symbol::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_upper_cased_and_validated() {
        assert_eq!(Symbol::new("btcusdt").unwrap().as_str(), "BTCUSDT");
        assert_eq!(Symbol::new(""), Err(SymbolError::Empty));
        assert_eq!(Symbol::new("BTC-USDT"), Err(SymbolError::InvalidByte(3)));
        assert_eq!(Symbol::new(&"A".repeat(25)), Err(SymbolError::TooLong));
        assert_eq!(Symbol::new(&"A".repeat(24)).unwrap().as_str().len(), 24);
    }

    #[test]
    fn wire_bytes_with_junk_after_the_name_are_refused() {
        let mut b = *Symbol::new("ETHUSDT").unwrap().as_bytes();
        assert!(Symbol::from_wire(&b).is_ok());
        b[10] = b'X';
        assert_eq!(Symbol::from_wire(&b), Err(SymbolError::InvalidByte(10)));
        b = [0; SYMBOL_MAX_LEN];
        assert_eq!(Symbol::from_wire(&b), Err(SymbolError::Empty));
        b[0] = b'"';
        assert_eq!(Symbol::from_wire(&b), Err(SymbolError::InvalidByte(0)));
    }
}
