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
        if bytes[0] == 0 {
            return Err(SymbolError::Empty);
        }
        if wire_name_ok(bytes) {
            return Ok(Symbol { bytes: *bytes });
        }
        // The slow path, only to name the first bad byte.
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(SYMBOL_MAX_LEN);
        let bad =
            bytes.iter().enumerate().position(|(i, &c)| if i < len { !name_byte(c) } else { c != 0 }).unwrap_or(0);
        Err(SymbolError::InvalidByte(bad))
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

fn name_byte(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

/// Whether `bytes` is a name of `A-Z0-9` followed by zero padding only, eight bytes at a time
/// (every reader checks the symbol of every trade and K-line frame it reads). Per byte `b` of a
/// little-endian word, the `0x80` bit of each mask below says one thing; the additions cannot
/// carry into the next byte because every byte is first checked to be below `0x80`.
fn wire_name_ok(bytes: &[u8; SYMBOL_MAX_LEN]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    const LOW7: u64 = ONES * 0x7f;
    // `b >= lo` and `b > hi` for all bytes at once (b < 0x80).
    let at_least = |w: u64, lo: u8| w.wrapping_add(ONES * u64::from(0x80 - lo)) & HIGH;
    let above = |w: u64, hi: u8| w.wrapping_add(ONES * u64::from(0x7f - hi)) & HIGH;
    let mut previous_full = true;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        if w & HIGH != 0 {
            return false;
        }
        let nonzero = ((w & LOW7).wrapping_add(LOW7) | w) & HIGH;
        let upper = at_least(w, b'A') & !above(w, b'Z');
        let digit = at_least(w, b'0') & !above(w, b'9');
        if nonzero & !(upper | digit) != 0 {
            return false;
        }
        // The name's bytes must be a prefix: 0xff in every nonzero byte, then only zero bytes,
        // and a word may hold name bytes only if the one before was all name.
        let filled = (nonzero >> 7) * 0xff;
        if filled & filled.wrapping_add(1) != 0 || (filled != 0 && !previous_full) {
            return false;
        }
        previous_full = filled == u64::MAX;
    }
    true
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
    fn wire_check_agrees_with_a_byte_by_byte_reading() {
        // The reference: a name of A-Z0-9, then zeros only.
        fn reference(b: &[u8; SYMBOL_MAX_LEN]) -> bool {
            let len = b.iter().position(|&c| c == 0).unwrap_or(SYMBOL_MAX_LEN);
            len > 0 && b[..len].iter().all(|&c| name_byte(c)) && b[len..].iter().all(|&c| c == 0)
        }
        let mut cases = 0;
        for name in ["A", "BTCUSDT", "ETH1000USDT", &"Z".repeat(8), &"Q9".repeat(8), &"A".repeat(24)] {
            let base = *Symbol::new(name).unwrap().as_bytes();
            for at in 0..SYMBOL_MAX_LEN {
                for v in 0..=255u8 {
                    let mut b = base;
                    b[at] = v;
                    assert_eq!(Symbol::from_wire(&b).is_ok(), reference(&b), "{name} with byte {at} = {v:#x}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 6 * 24 * 256);
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
