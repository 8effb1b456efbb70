//! Sizes. Every byte count in Trireme is a [`ByteSize`]: on the wire (JSON, protobuf) it is a
//! plain number of bytes; for people it reads and prints with binary suffixes (KiB … TiB).

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = u64, example = 1073741824)]
pub struct ByteSize(u64);

/// Why a string is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error(
        "{input:?} is not a size: expected a number with an optional suffix B, KiB, MiB, GiB or TiB"
    )]
    Invalid { input: String },
    #[error("{input:?} is too large")]
    Overflow { input: String },
}

impl ByteSize {
    pub const ZERO: Self = Self(0);
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;
    pub const TIB: u64 = 1 << 40;

    pub const fn b(bytes: u64) -> Self {
        Self(bytes)
    }
    pub const fn kib(n: u64) -> Self {
        Self(n * Self::KIB)
    }
    pub const fn mib(n: u64) -> Self {
        Self(n * Self::MIB)
    }
    pub const fn gib(n: u64) -> Self {
        Self(n * Self::GIB)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }
    pub const fn is_multiple_of(self, unit: u64) -> bool {
        self.0.is_multiple_of(unit)
    }
    /// Rounds up to a multiple of `unit` (a power of two), saturating.
    pub const fn align_up(self, unit: u64) -> Self {
        let mask = unit - 1;
        Self(self.0.saturating_add(mask) & !mask)
    }
    pub const fn checked_add(self, other: Self) -> Option<Self> {
        match self.0.checked_add(other.0) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
    pub const fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl From<u64> for ByteSize {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

impl From<ByteSize> for u64 {
    fn from(value: ByteSize) -> Self {
        value.0
    }
}

impl Add for ByteSize {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Self(self.0.saturating_add(rhs.0))
    }
}

impl Sub for ByteSize {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        Self(self.0.saturating_sub(rhs.0))
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = || ByteSizeError::Invalid { input: input.to_owned() };
        let s = input.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(split);
        if digits.is_empty() {
            return Err(invalid());
        }
        let n: u64 =
            digits.parse().map_err(|_| ByteSizeError::Overflow { input: input.to_owned() })?;
        let unit = match suffix.trim() {
            "" | "B" => 1,
            "K" | "KiB" => Self::KIB,
            "M" | "MiB" => Self::MIB,
            "G" | "GiB" => Self::GIB,
            "T" | "TiB" => Self::TIB,
            _ => return Err(invalid()),
        };
        n.checked_mul(unit)
            .map(Self)
            .ok_or_else(|| ByteSizeError::Overflow { input: input.to_owned() })
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that divides the size exactly, so that the printed form
    /// parses back to the same number (`4GiB`, `1536MiB`, `4097B`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (ByteSize::TIB, "TiB"),
            (ByteSize::GIB, "GiB"),
            (ByteSize::MIB, "MiB"),
            (ByteSize::KIB, "KiB"),
        ];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("10GiB".parse::<ByteSize>().unwrap(), ByteSize::gib(10));
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize::b(4096));
        assert_eq!("1 TiB".parse::<ByteSize>().unwrap(), ByteSize::b(1 << 40));
        assert!("".parse::<ByteSize>().is_err());
        assert!("GiB".parse::<ByteSize>().is_err());
        assert!("10GB".parse::<ByteSize>().is_err());
        assert!("-1".parse::<ByteSize>().is_err());
        assert!(matches!(
            "99999999999TiB".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow { .. })
        ));
    }

    #[test]
    fn prints_exact_units() {
        assert_eq!(ByteSize::gib(4).to_string(), "4GiB");
        assert_eq!(ByteSize::mib(1536).to_string(), "1536MiB");
        assert_eq!(ByteSize::b(4097).to_string(), "4097B");
        assert_eq!(ByteSize::ZERO.to_string(), "0B");
    }

    proptest! {
        #[test]
        fn display_round_trips(n in any::<u64>()) {
            let s = ByteSize::b(n);
            prop_assert_eq!(s.to_string().parse::<ByteSize>().unwrap(), s);
        }
    }
}
