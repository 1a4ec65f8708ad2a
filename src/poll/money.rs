//! The row's amount in Stripe's terms: an integer count of the currency's minor unit.
//!
//! The row holds an exact decimal in major units (`12.50` USD); Stripe holds `amount` and
//! `amount_received` as integers in the minor unit (`1250`). The exponent is the currency's as
//! Stripe counts it (Stripe's "Supported currencies" page): most currencies take two decimals,
//! the zero-decimal ones none (`500` JPY is `500`), the three-decimal ones three (`5.120` KWD is
//! `5120`; Stripe also wants their last digit to be 0, which is the payment service's concern
//! when it creates the intent, not a reason to round here). The conversion is exact or refused,
//! never rounded and never through a float: a row amount with more decimals than the currency
//! has (`12.345` USD) has no Stripe counterpart, so it can never match.

use crate::change::Decimal;

/// Stripe's zero-decimal currencies. ISK, HUF and TWD are not here: Stripe represents them with
/// two decimals for backwards compatibility (their minor amounts end in `00`), so the default
/// exponent of two is right for them.
const ZERO_DECIMAL: [&str; 16] = [
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// Stripe's three-decimal currencies.
const THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];

/// How many decimals the currency's minor unit has, as Stripe counts them.
pub fn exponent(currency: &str) -> u32 {
    let c = currency.trim().to_ascii_lowercase();
    if ZERO_DECIMAL.contains(&c.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&c.as_str()) {
        3
    } else {
        2
    }
}

/// Why a row's amount has no minor-unit value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The row's amount is not a decimal (the CDC decoder stores exact text; this is a bug or
    /// a damaged entry).
    #[error("row amount {0:?} is not a decimal")]
    Syntax(String),
    /// More decimals than the currency has, not all zero: no Stripe amount equals it.
    #[error("row amount {amount} has more decimals than {currency} ({exponent})")]
    TooPrecise {
        amount: String,
        currency: String,
        exponent: u32,
    },
    #[error("row amount {0} does not fit a Stripe amount")]
    Overflow(String),
}

/// The row's amount in the currency's minor unit, exactly.
pub fn to_minor_units(amount: &str, currency: &str) -> Result<i64, MoneyError> {
    let d = Decimal::parse(amount).map_err(|_| MoneyError::Syntax(amount.to_string()))?;
    let exp = exponent(currency);
    let overflow = || MoneyError::Overflow(amount.to_string());
    let minor: i128 = if d.scale <= exp {
        10i128
            .checked_pow(exp - d.scale)
            .and_then(|m| d.unscaled.checked_mul(m))
            .ok_or_else(overflow)?
    } else {
        // Extra decimals are fine only while they are zeros (`12.500` USD is 1250).
        let div = 10i128.checked_pow(d.scale - exp).ok_or_else(overflow)?;
        if d.unscaled % div != 0 {
            return Err(MoneyError::TooPrecise {
                amount: amount.to_string(),
                currency: currency.to_string(),
                exponent: exp,
            });
        }
        d.unscaled / div
    };
    i64::try_from(minor).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_decimal_currencies() {
        assert_eq!(to_minor_units("12.34", "usd"), Ok(1234));
        assert_eq!(to_minor_units("12.34", "USD"), Ok(1234));
        assert_eq!(to_minor_units("0.01", "eur"), Ok(1));
        assert_eq!(to_minor_units("100.00", "gbp"), Ok(10000));
        assert_eq!(to_minor_units("100", "gbp"), Ok(10000));
        assert_eq!(to_minor_units("9999999999.99", "usd"), Ok(999_999_999_999));
        assert_eq!(to_minor_units("-5.50", "usd"), Ok(-550));
        // Trailing zeros beyond the exponent are exact; other digits are not.
        assert_eq!(to_minor_units("12.500", "usd"), Ok(1250));
        assert!(matches!(
            to_minor_units("12.345", "usd"),
            Err(MoneyError::TooPrecise { exponent: 2, .. })
        ));
        // ISK is two-decimal in Stripe's representation.
        assert_eq!(to_minor_units("5", "isk"), Ok(500));
    }

    #[test]
    fn zero_decimal_currencies() {
        assert_eq!(to_minor_units("500", "jpy"), Ok(500));
        assert_eq!(to_minor_units("500.00", "JPY"), Ok(500));
        assert_eq!(to_minor_units("12000", "krw"), Ok(12000));
        assert!(to_minor_units("500.5", "jpy").is_err());
    }

    #[test]
    fn three_decimal_currencies() {
        assert_eq!(to_minor_units("5.120", "kwd"), Ok(5120));
        assert_eq!(to_minor_units("5.12", "kwd"), Ok(5120));
        assert_eq!(to_minor_units("1.005", "bhd"), Ok(1005));
        assert_eq!(to_minor_units("0.001", "omr"), Ok(1));
        for c in ["bhd", "jod", "kwd", "omr", "tnd"] {
            assert_eq!(exponent(c), 3, "{c}");
        }
        assert!(to_minor_units("1.0005", "tnd").is_err());
    }

    #[test]
    fn garbage_and_overflow_are_refused() {
        assert!(matches!(
            to_minor_units("twelve", "usd"),
            Err(MoneyError::Syntax(_))
        ));
        assert!(matches!(
            to_minor_units("99999999999999999999", "usd"),
            Err(MoneyError::Overflow(_))
        ));
    }
}
