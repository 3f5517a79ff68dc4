//! Exact decimals as fixed-point integers.
//!
//! Prices and quantities travel as integer mantissas with a per-symbol scale (number of
//! fractional digits): `87232.01` at scale 2 is `8723201`. Parsing accepts Binance decimal strings
//! (`"87232.01000000"`) and refuses anything that would lose a digit; rendering produces Binance's
//! form (at least 8 fractional digits, more if the scale needs them), so a value round-trips
//! exactly. Upstream: exchange feeds and CSV files; downstream: K-line arithmetic and JSON.

use std::fmt;

/// Largest scale accepted: 18 fractional digits (an `i128` holds 38 digits).
pub const MAX_SCALE: u8 = 18;

/// Binance renders every decimal with this many fractional digits.
pub const BINANCE_FRACTION_DIGITS: u8 = 8;

/// Why a decimal string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalParseError {
    #[error("empty decimal")]
    Empty,
    #[error("invalid character at byte {0}")]
    InvalidChar(usize),
    #[error("more than {scale} significant fractional digits (value would be rounded)")]
    TooPrecise { scale: u8 },
    #[error("decimal out of range")]
    Overflow,
    #[error("scale {0} above the maximum of 18")]
    BadScale(u8),
}

/// An exact decimal: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fixed {
    pub mantissa: i128,
    pub scale: u8,
}

const POW10: [i128; 19] = {
    let mut t = [1i128; 19];
    let mut i = 1;
    while i < 19 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// `10^scale` for `scale <= 18`.
pub fn pow10(scale: u8) -> i128 {
    POW10[usize::from(scale.min(MAX_SCALE))]
}

impl Fixed {
    pub const fn new(mantissa: i128, scale: u8) -> Self {
        Fixed { mantissa, scale }
    }

    /// Parses a decimal string (`"-12.3400"`, `"7"`, `".5"`) at the given scale. Trailing zeros
    /// beyond the scale are accepted; a non-zero digit beyond it is refused.
    pub fn parse(s: &str, scale: u8) -> Result<Fixed, DecimalParseError> {
        if scale > MAX_SCALE {
            return Err(DecimalParseError::BadScale(scale));
        }
        let bytes = s.as_bytes();
        let (neg, start) = match bytes.first() {
            None => return Err(DecimalParseError::Empty),
            Some(b'-') => (true, 1),
            Some(b'+') => (false, 1),
            Some(_) => (false, 0),
        };
        let mut mantissa: i128 = 0;
        let mut frac_digits: u8 = 0;
        let mut seen_dot = false;
        let mut seen_digit = false;
        for (i, &b) in bytes.iter().enumerate().skip(start) {
            match b {
                b'0'..=b'9' => {
                    seen_digit = true;
                    let d = i128::from(b - b'0');
                    if seen_dot {
                        if frac_digits == scale {
                            if d != 0 {
                                return Err(DecimalParseError::TooPrecise { scale });
                            }
                            continue;
                        }
                        frac_digits += 1;
                    }
                    mantissa =
                        mantissa.checked_mul(10).and_then(|m| m.checked_add(d)).ok_or(DecimalParseError::Overflow)?;
                }
                b'.' if !seen_dot => seen_dot = true,
                _ => return Err(DecimalParseError::InvalidChar(i)),
            }
        }
        if !seen_digit {
            return Err(DecimalParseError::Empty);
        }
        mantissa = mantissa.checked_mul(pow10(scale - frac_digits)).ok_or(DecimalParseError::Overflow)?;
        Ok(Fixed { mantissa: if neg { -mantissa } else { mantissa }, scale })
    }

    /// Parses into an `i64` mantissa (prices and quantities on the wire).
    pub fn parse_i64(s: &str, scale: u8) -> Result<i64, DecimalParseError> {
        let f = Fixed::parse(s, scale)?;
        i64::try_from(f.mantissa).map_err(|_| DecimalParseError::Overflow)
    }

    /// Writes Binance's form: at least 8 fractional digits; more only where digits beyond the
    /// 8th are not zero (a quote volume of two 8-digit decimals has scale 16, but is usually
    /// exact in 8).
    pub fn write_binance(&self, out: &mut String) {
        let mut f = *self;
        while f.scale > BINANCE_FRACTION_DIGITS && f.mantissa % 10 == 0 {
            f.mantissa /= 10;
            f.scale -= 1;
        }
        f.write_with(out, BINANCE_FRACTION_DIGITS.max(f.scale));
    }

    /// Writes exactly `frac` fractional digits, which must be at least the scale (so nothing is
    /// lost); a smaller `frac` is raised to the scale.
    pub fn write_with(&self, out: &mut String, frac: u8) {
        let frac = frac.max(self.scale).min(38);
        let scale = self.scale.min(MAX_SCALE);
        let neg = self.mantissa < 0;
        let abs = self.mantissa.unsigned_abs();
        let unit = pow10(scale).unsigned_abs();
        let int_part = abs / unit;
        let frac_part = abs % unit;
        if neg {
            out.push('-');
        }
        push_u128(out, int_part);
        if frac > 0 {
            out.push('.');
            // The scale's digits, zero-padded on the left, then zeros up to `frac`.
            let mut digits = [b'0'; 18];
            let mut v = frac_part;
            for slot in digits[..usize::from(scale)].iter_mut().rev() {
                *slot = b'0' + (v % 10) as u8;
                v /= 10;
            }
            for &d in &digits[..usize::from(scale)] {
                out.push(char::from(d));
            }
            for _ in scale..frac {
                out.push('0');
            }
        }
    }

    /// Renders with the minimum digits the scale needs (e.g. for CSV files).
    pub fn to_plain_string(&self) -> String {
        let mut s = String::new();
        self.write_with(&mut s, self.scale);
        s
    }
}

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(32);
        self.write_binance(&mut s);
        f.write_str(&s)
    }
}

fn push_u128(out: &mut String, mut v: u128) {
    let mut buf = [0u8; 40];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
}

/// Number of fractional digits a decimal string uses once trailing zeros are removed
/// (`"0.01000000"` → 2). Useful to infer a symbol's scale from exchange data.
pub fn significant_fraction_digits(s: &str) -> usize {
    match s.split_once('.') {
        None => 0,
        Some((_, frac)) => frac.trim_end_matches('0').len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binance_price_string_parses_and_renders_back_exactly() {
        let f = Fixed::parse("87232.01000000", 2).unwrap();
        assert_eq!(f.mantissa, 8_723_201);
        assert_eq!(f.to_string(), "87232.01000000");
        let q = Fixed::parse("0.00012000", 5).unwrap();
        assert_eq!(q.mantissa, 12);
        assert_eq!(q.to_string(), "0.00012000");
    }

    #[test]
    fn negative_and_bare_forms_parse() {
        assert_eq!(Fixed::parse("-1.5", 3).unwrap().mantissa, -1500);
        assert_eq!(Fixed::parse(".5", 1).unwrap().mantissa, 5);
        assert_eq!(Fixed::parse("7", 0).unwrap().mantissa, 7);
        assert_eq!(Fixed::parse("7.", 2).unwrap().mantissa, 700);
    }

    #[test]
    fn parse_refuses_rounding_and_garbage() {
        assert_eq!(Fixed::parse("1.234", 2), Err(DecimalParseError::TooPrecise { scale: 2 }));
        assert_eq!(Fixed::parse("", 2), Err(DecimalParseError::Empty));
        assert_eq!(Fixed::parse("-", 2), Err(DecimalParseError::Empty));
        assert_eq!(Fixed::parse("1.2.3", 2), Err(DecimalParseError::InvalidChar(3)));
        assert_eq!(Fixed::parse("1e5", 2), Err(DecimalParseError::InvalidChar(1)));
        assert_eq!(Fixed::parse("1", 19), Err(DecimalParseError::BadScale(19)));
        assert_eq!(Fixed::parse("99999999999999999999999999999999999999999", 0), Err(DecimalParseError::Overflow));
        assert_eq!(Fixed::parse_i64("99999999999999999999", 0), Err(DecimalParseError::Overflow));
    }

    #[test]
    fn scales_above_eight_render_every_digit() {
        let f = Fixed::new(123_456_789_012, 10);
        assert_eq!(f.to_string(), "12.3456789012");
        assert_eq!(Fixed::new(-5, 2).to_string(), "-0.05000000");
        assert_eq!(Fixed::new(0, 0).to_string(), "0.00000000");
        assert_eq!(Fixed::new(i128::MIN, 18).to_plain_string().len(), 41);
    }

    proptest! {
        #[test]
        fn any_mantissa_round_trips_through_its_binance_string(m in any::<i64>(), scale in 0u8..=18) {
            let f = Fixed::new(i128::from(m), scale);
            let s = f.to_string();
            prop_assert_eq!(Fixed::parse(&s, scale).unwrap(), f);
            prop_assert_eq!(Fixed::parse(&f.to_plain_string(), scale).unwrap(), f);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,40}", scale in 0u8..=20) {
            let _ = Fixed::parse(&s, scale);
        }
    }
}
