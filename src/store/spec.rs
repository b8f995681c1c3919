//! The export model, one type per concept: a validated [`ExportName`], an
//! [`ExportSpec`] (name and size) and the [`Exports`] a sidecar is asked to
//! serve. Config, the NBD handshake and the store all use these, so the name
//! rule and the size limits are written once (the limits come from
//! [`super::format`]).

use std::path::Path;

use super::{existing_exports, format, StoreError};

/// Name of the export created in a fresh data directory when none is
/// configured, and the one the empty NBD export name selects.
pub const DEFAULT_EXPORT_NAME: &str = "default";
/// Size of that export.
pub const DEFAULT_EXPORT_SIZE: u64 = 1 << 30;
/// Export sizes are whole 512-byte sectors.
pub const EXPORT_SIZE_ALIGN: u64 = 512;

/// An export name safe to use as a file name component: 1..=64 bytes of
/// `[A-Za-z0-9._-]`, not starting with a dot (so never `.`, `..`, hidden or a
/// path). The empty name (default export) is handled by the connection layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportName(String);

/// Why a string is not an [`ExportName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty name.
    #[error("export name is empty")]
    Empty,
    /// Longer than [`format::NAME_MAX`] bytes.
    #[error("export name is {0} bytes long (maximum 64)")]
    TooLong(usize),
    /// Starts with `.`.
    #[error("export name must not start with '.'")]
    LeadingDot,
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("export name contains {0:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")]
    InvalidChar(char),
}

impl ExportName {
    /// Validates `s` (see the type's documentation).
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > format::NAME_MAX {
            return Err(NameError::TooLong(s.len()));
        }
        if s.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::InvalidChar(bad));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::str::FromStr for ExportName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for ExportName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ExportName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a size is not a valid export size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Zero bytes.
    #[error("size must be greater than zero")]
    Zero,
    /// Not whole sectors.
    #[error("size {0} is not a multiple of 512 bytes")]
    Unaligned(u64),
    /// Above [`format::MAX_EXPORT_SIZE`].
    #[error("size {0} is larger than the maximum 2^50 bytes (1P)")]
    TooLarge(u64),
}

/// Checks an export size: non-zero, a multiple of [`EXPORT_SIZE_ALIGN`], at
/// most [`format::MAX_EXPORT_SIZE`].
pub fn check_size(size: u64) -> Result<u64, SizeError> {
    if size == 0 {
        Err(SizeError::Zero)
    } else if !size.is_multiple_of(EXPORT_SIZE_ALIGN) {
        Err(SizeError::Unaligned(size))
    } else if size > format::MAX_EXPORT_SIZE {
        Err(SizeError::TooLarge(size))
    } else {
        Ok(size)
    }
}

/// A requested export: created when missing, grown when larger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Name.
    pub name: ExportName,
    /// Size in bytes (checked by [`check_size`] when built with [`ExportSpec::new`]).
    pub size: u64,
}

impl ExportSpec {
    /// A spec with a checked size.
    pub fn new(name: ExportName, size: u64) -> Result<Self, SizeError> {
        Ok(Self {
            name,
            size: check_size(size)?,
        })
    }

    /// The export a fresh data directory gets when none is configured.
    pub fn default_export() -> Self {
        Self {
            name: ExportName(DEFAULT_EXPORT_NAME.to_owned()),
            size: DEFAULT_EXPORT_SIZE,
        }
    }
}

/// Which exports a sidecar is asked to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exports {
    /// Configured explicitly: each is created when missing and grown when
    /// larger, in a fresh or an existing data directory.
    Explicit(Vec<ExportSpec>),
    /// Nothing configured: a fresh data directory gets
    /// [`ExportSpec::default_export`]; an existing one serves what it has.
    Default,
}

impl Exports {
    /// The configured specs; empty for [`Exports::Default`].
    pub fn explicit(&self) -> &[ExportSpec] {
        match self {
            Exports::Explicit(specs) => specs,
            Exports::Default => &[],
        }
    }

    /// The specs to create or grow in `data_dir`.
    pub fn resolve(&self, data_dir: &Path) -> Result<Vec<ExportSpec>, StoreError> {
        match self {
            Exports::Explicit(specs) => Ok(specs.clone()),
            Exports::Default if existing_exports(data_dir)?.is_empty() => {
                Ok(vec![ExportSpec::default_export()])
            }
            Exports::Default => Ok(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn export_names() {
        for ok in ["a", "disk-0", "A.b_c", "x..y", "0", &"z".repeat(64)] {
            assert_eq!(
                ExportName::parse(ok).map(|n| n.to_string()),
                Ok(ok.to_string())
            );
        }
        assert_eq!(ExportName::parse(""), Err(NameError::Empty));
        assert_eq!(ExportName::parse(".a"), Err(NameError::LeadingDot));
        assert_eq!(ExportName::parse(".."), Err(NameError::LeadingDot));
        assert_eq!(ExportName::parse("a/b"), Err(NameError::InvalidChar('/')));
        assert_eq!(ExportName::parse("../x"), Err(NameError::LeadingDot));
        assert_eq!(ExportName::parse("a b"), Err(NameError::InvalidChar(' ')));
        assert_eq!(ExportName::parse("é"), Err(NameError::InvalidChar('é')));
        assert_eq!(ExportName::parse("a\0"), Err(NameError::InvalidChar('\0')));
        assert_eq!(
            ExportName::parse(&"z".repeat(65)),
            Err(NameError::TooLong(65))
        );
        let n: ExportName = "vol1".parse().unwrap();
        assert_eq!(n.as_str(), "vol1");
        assert_eq!(n.as_ref(), "vol1");
        assert_eq!(n.into_string(), "vol1");
    }

    fn oracle(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes().all(|b| {
                b.is_ascii_uppercase()
                    || b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'.'
                    || b == b'_'
                    || b == b'-'
            })
    }

    #[test]
    fn sizes() {
        assert_eq!(check_size(512), Ok(512));
        assert_eq!(check_size(1 << 50), Ok(1 << 50));
        assert_eq!(check_size(0), Err(SizeError::Zero));
        assert_eq!(check_size(1000), Err(SizeError::Unaligned(1000)));
        assert_eq!(
            check_size((1 << 50) + 512),
            Err(SizeError::TooLarge((1 << 50) + 512))
        );
    }

    #[test]
    fn explicit_exports_apply_to_an_existing_directory() {
        let d = tempfile::tempdir().unwrap();
        let bigger = ExportSpec::new(ExportName::parse("default").unwrap(), 2 << 30).unwrap();
        // Fresh directory: the default export, or exactly what was asked.
        assert_eq!(
            Exports::Default.resolve(d.path()).unwrap(),
            [ExportSpec::default_export()]
        );
        let explicit = Exports::Explicit(vec![bigger.clone()]);
        assert_eq!(
            explicit.resolve(d.path()).unwrap(),
            std::slice::from_ref(&bigger)
        );
        // Existing directory: the default leaves it alone, an explicit list
        // (even one naming only `default`) is still applied.
        std::fs::create_dir_all(super::super::exports_dir(d.path())).unwrap();
        std::fs::write(super::super::exports_dir(d.path()).join("default.ear"), b"").unwrap();
        assert_eq!(Exports::Default.resolve(d.path()).unwrap(), []);
        assert_eq!(explicit.resolve(d.path()).unwrap(), [bigger]);
    }

    proptest! {
        #[test]
        fn export_name_matches_oracle(s in "[A-Za-z0-9._/ \\-\u{0}\u{e9}:]{0,70}") {
            prop_assert_eq!(ExportName::parse(&s).is_ok(), oracle(&s));
        }

        #[test]
        fn export_name_any_string_matches_oracle(s in any::<String>()) {
            prop_assert_eq!(ExportName::parse(&s).is_ok(), oracle(&s));
        }

        #[test]
        fn valid_export_names_accepted(s in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}") {
            let n = ExportName::parse(&s);
            prop_assert_eq!(n.map(ExportName::into_string), Ok(s));
        }
    }
}
