//! Exact decimals for money. Amounts never pass through a float: Debezium's encodings (Connect
//! `Decimal` bytes, `VariableScaleDecimal`, strings, and JSON numbers read as raw text) are all
//! turned into an unscaled integer plus a scale, and printed back as a plain decimal string.

use std::fmt;

/// An exact decimal: `unscaled × 10^-scale`. 38 significant digits (i128) are far beyond any
/// `NUMERIC(p, s)` a payments table uses; wider values are rejected, never rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub unscaled: i128,
    pub scale: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecimalError {
    #[error("empty decimal bytes")]
    Empty,
    #[error("decimal of {0} bytes is wider than 16 bytes (38 digits)")]
    TooWide(usize),
    #[error("not a decimal number: {0:?}")]
    Syntax(String),
    #[error("decimal {0:?} has more than 38 digits")]
    Overflow(String),
}

impl Decimal {
    /// Kafka Connect `Decimal` / Avro `decimal`: the unscaled value as minimal big-endian two's
    /// complement bytes.
    pub fn from_be_bytes(bytes: &[u8], scale: u32) -> Result<Self, DecimalError> {
        if bytes.is_empty() {
            return Err(DecimalError::Empty);
        }
        if bytes.len() > 16 {
            return Err(DecimalError::TooWide(bytes.len()));
        }
        // Sign-extend from the first byte's top bit, then shift the bytes in.
        let mut v: i128 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
        for b in bytes {
            v = (v << 8) | i128::from(*b);
        }
        Ok(Decimal { unscaled: v, scale })
    }

    /// Parses decimal text exactly: `-12.50`, `1234567.89`, `1.2345E7`, `5e-3`.
    pub fn parse(text: &str) -> Result<Self, DecimalError> {
        let err = || DecimalError::Syntax(text.to_string());
        let s = text.trim();
        let (neg, s) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i32>().map_err(|_| err())?),
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err());
        }
        if !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let mut unscaled: i128 = 0;
        for b in int_part.bytes().chain(frac_part.bytes()) {
            unscaled = unscaled
                .checked_mul(10)
                .and_then(|v| v.checked_add(i128::from(b - b'0')))
                .ok_or_else(|| DecimalError::Overflow(text.to_string()))?;
        }
        let mut scale = frac_part.len() as i64 - i64::from(exp);
        while scale < 0 {
            unscaled = unscaled
                .checked_mul(10)
                .ok_or_else(|| DecimalError::Overflow(text.to_string()))?;
            scale += 1;
        }
        let scale = u32::try_from(scale).map_err(|_| err())?;
        Ok(Decimal {
            unscaled: if neg { -unscaled } else { unscaled },
            scale,
        })
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.unscaled.unsigned_abs().to_string();
        let sign = if self.unscaled < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
        } else {
            digits
        };
        let (i, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{i}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn connect_decimal_bytes_match_debezium_table() {
        // The table in shared/debezium/README.md.
        for (enc, want) in [
            ("E4c=", "49.99"),
            ("B1vNFQ==", "1234567.89"),
            ("AIA=", "1.28"),
            ("7Hk=", "-49.99"),
            ("AA==", "0.00"),
        ] {
            let d = Decimal::from_be_bytes(&b64(enc), 2).unwrap();
            assert_eq!(d.to_string(), want, "{enc}");
        }
    }

    #[test]
    fn text_is_parsed_exactly() {
        for (text, want) in [
            ("1234567.89", "1234567.89"),
            ("-0.5", "-0.5"),
            ("1.23456789E7", "12345678.9"),
            ("5e-3", "0.005"),
            ("100", "100"),
            ("0.30000000000000004", "0.30000000000000004"),
        ] {
            assert_eq!(Decimal::parse(text).unwrap().to_string(), want, "{text}");
        }
        assert!(Decimal::parse("12a").is_err());
        assert!(Decimal::parse("").is_err());
        assert!(Decimal::parse(".").is_err());
        assert!(Decimal::parse("1".repeat(40).as_str()).is_err());
    }

    #[test]
    fn wide_bytes_are_rejected_not_truncated() {
        assert_eq!(
            Decimal::from_be_bytes(&[1; 17], 2),
            Err(DecimalError::TooWide(17))
        );
        assert_eq!(Decimal::from_be_bytes(&[], 2), Err(DecimalError::Empty));
    }
}
