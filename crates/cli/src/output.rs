//! Rendering resources for people (`-o table`, the default) and for programs (`-o json`,
//! `-o yaml`). JSON and YAML are the REST resources as they are; tables pick a few columns per
//! resource (the [`Tabular`] impls beside each noun).

use std::io::Write;

use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use crate::error::CliError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns for people.
    #[default]
    Table,
    /// The REST resource, pretty-printed.
    Json,
    /// The REST resource as YAML.
    Yaml,
}

/// A resource that has a row in a table.
pub trait Tabular {
    const HEADERS: &'static [&'static str];
    fn row(&self) -> Vec<String>;
}

/// Renders a list of resources.
pub fn list<T: Serialize + Tabular>(items: &[T], format: Output) -> Result<String, CliError> {
    match format {
        Output::Table => Ok(table(T::HEADERS, items.iter().map(Tabular::row))),
        Output::Json => json(&items),
        Output::Yaml => yaml(&items),
    }
}

/// Renders one resource: a one-row table, or the resource itself.
pub fn one<T: Serialize + Tabular>(item: &T, format: Output) -> Result<String, CliError> {
    match format {
        Output::Table => Ok(table(T::HEADERS, std::iter::once(item.row()))),
        Output::Json => json(item),
        Output::Yaml => yaml(item),
    }
}

pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value).map_err(|e| CliError::Format(e.to_string()))
}

pub fn yaml<T: Serialize + ?Sized>(value: &T) -> Result<String, CliError> {
    let s = serde_norway::to_string(value).map_err(|e| CliError::Format(e.to_string()))?;
    Ok(s.trim_end().to_owned())
}

/// A borderless table, like `kubectl get`: easy to read and to cut with `awk`.
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().copied());
    for row in rows {
        t.add_row(row);
    }
    // The preset pads every cell with a space on each side; lines need no trailing blanks.
    t.lines().map(|l| l.trim().to_owned()).collect::<Vec<_>>().join("\n")
}

/// How a state enum spells itself on the wire (`online`, `missing`), for enums without Display.
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

/// `-` for what is absent, so columns never collapse.
pub fn or_dash(value: Option<String>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or_else(|| "-".to_owned())
}

/// A byte count for people: exact sizes as they parse (`1GiB`, `4097B`), others to one decimal
/// of their largest unit (`1.5GiB`, `12.3MiB`), for progress that is rarely a round number.
pub fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] =
        [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit {
            if bytes.is_multiple_of(unit) {
                return format!("{}{name}", bytes / unit);
            }
            // Tenths, rounded down, in integers so that 1.99 never prints as 2.0.
            let tenths = u128::from(bytes) * 10 / u128::from(unit);
            return format!("{}.{}{name}", tenths / 10, tenths % 10);
        }
    }
    format!("{bytes}B")
}

/// Writes `text` and a newline to stdout. A closed pipe (`trireme … | head`) is not an error.
pub fn emit(text: &str) -> Result<(), CliError> {
    if text.is_empty() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Write(e)),
        _ => Ok(()),
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, to the second.
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of a day number counted from 1970-01-01: shift the epoch to
/// 0000-03-01 so that leap days fall at the end of each year, then split 400-year eras.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Thing {
        name: String,
        size: u64,
    }

    impl Tabular for Thing {
        const HEADERS: &'static [&'static str] = &["NAME", "SIZE"];
        fn row(&self) -> Vec<String> {
            vec![self.name.clone(), self.size.to_string()]
        }
    }

    fn things() -> Vec<Thing> {
        vec![Thing { name: "a".into(), size: 1 }, Thing { name: "longer".into(), size: 22 }]
    }

    #[test]
    fn tables_align_columns_without_borders() {
        let t = list(&things(), Output::Table).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        let col = lines[0].find("SIZE").unwrap();
        assert_eq!(lines[1].find('1'), Some(col), "{t}");
        assert_eq!(lines[2].find("22"), Some(col), "{t}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{t}");
        assert!(!t.contains('|') && !t.contains('+') && !t.contains('─'), "{t}");
    }

    #[test]
    fn an_empty_table_has_its_header() {
        let t = list::<Thing>(&[], Output::Table).unwrap();
        assert_eq!(t.split_whitespace().collect::<Vec<_>>(), ["NAME", "SIZE"]);
    }

    #[test]
    fn json_and_yaml_are_the_resources() {
        let j: serde_json::Value =
            serde_json::from_str(&list(&things(), Output::Json).unwrap()).unwrap();
        assert_eq!(j[1]["name"], "longer");
        let y = one(&things()[0], Output::Yaml).unwrap();
        assert_eq!(y, "name: a\nsize: 1");
    }

    #[test]
    fn output_flag_values() {
        assert_eq!(Output::from_str("yaml", false).unwrap(), Output::Yaml);
        assert!(Output::from_str("xml", false).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(timestamp(4_107_542_399_000), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn helpers() {
        assert_eq!(or_dash(None), "-");
        assert_eq!(or_dash(Some(String::new())), "-");
        assert_eq!(or_dash(Some("x".into())), "x");
        assert_eq!(wire_name(&trireme_api::PoolState::Online), "online");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(1023), "1023B");
        assert_eq!(human(1 << 30), "1GiB");
        assert_eq!(human(3 << 29), "1.5GiB");
        assert_eq!(human((2 << 20) - 1), "1.9MiB");
        assert_eq!(human(5 << 40), "5TiB");
    }
}
