//! Identifiers. Nodes and pools are named by the operator; volumes, replicas and snapshots carry
//! a UUID (a volume also has a user-facing [`Name`]). Every id is its own type so that a replica
//! id can never be passed where a volume id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("name must not be empty")]
    Empty,
    #[error("name {name:?} is longer than {max} characters")]
    TooLong { name: String, max: usize },
    #[error(
        "name {name:?} may contain only lowercase letters, digits, '-', '_' and '.', \
         and must start with a letter or digit"
    )]
    BadCharacter { name: String },
    #[error("{value:?} is not a valid UUID")]
    BadUuid { value: String },
}

/// A user-chosen name: DNS-label-like so it is safe in URLs, file names, NBD export names,
/// metric labels and Kubernetes object names alike.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "vol-1")]
pub struct Name(String);

impl Name {
    pub const MAX_LEN: usize = 253;

    pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
        let name = name.into();
        if name.is_empty() {
            return Err(IdError::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(IdError::TooLong { name, max: Self::MAX_LEN });
        }
        let ok_first =
            name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_rest = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
        if !ok_first || !ok_rest {
            return Err(IdError::BadCharacter { name });
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Name> for String {
    fn from(value: Name) -> Self {
        value.0
    }
}

impl FromStr for Name {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Declares a newtype over [`Name`] for resources the operator names.
macro_rules! named_id {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String)]
        pub struct $ty(Name);

        impl $ty {
            pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
                Name::new(name).map(Self)
            }
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }
    };
}

/// Declares a newtype over [`Uuid`] for resources the system identifies.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $ty(Uuid);

        impl $ty {
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::BadUuid { value: s.to_owned() })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($ty), self.0)
            }
        }
    };
}

named_id!(
    /// A storage node, named by the operator (`node-1`, or the Kubernetes node name).
    NodeId
);
named_id!(
    /// A pool, named by the operator; unique in the cluster.
    PoolId
);
uuid_id!(
    /// A volume. Also the NBD export name of the volume's nexus.
    VolumeId
);
uuid_id!(
    /// A replica: one copy of a volume's data, carved out of a pool.
    ReplicaId
);
uuid_id!(
    /// A snapshot of a replica (and, through control, of a volume).
    SnapshotId
);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(Name::new("vol-1").is_ok());
        assert!(Name::new("pvc-0a1b.c_d").is_ok());
        assert_eq!(Name::new(""), Err(IdError::Empty));
        assert!(matches!(Name::new("Vol"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(Name::new("-x"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(Name::new("a/b"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(Name::new("x".repeat(254)), Err(IdError::TooLong { .. })));
    }

    #[test]
    fn ids_round_trip_through_json() {
        let n = NodeId::new("node-1").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"node-1\"");
        let bad: Result<NodeId, _> = serde_json::from_str("\"Node 1\"");
        assert!(bad.is_err());
        let v = VolumeId::new_random();
        let back: VolumeId = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(v, back);
        assert!("not-a-uuid".parse::<VolumeId>().is_err());
    }
}
