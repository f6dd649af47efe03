//! Pagination of list endpoints.
//!
//! Every list endpoint takes `?limit=N` (1 to [`MAX_LIMIT`], default
//! [`DEFAULT_LIMIT`]) and `?cursor=C`, and answers with its items plus
//! `nextCursor`: a string to pass as `cursor` for the next page, or `null`
//! when there is nothing after this page. A cursor is opaque to clients (the
//! base64url of the last item's sort key); a page may hold fewer than
//! `limit` items and still have a `nextCursor` (filters scan a bounded
//! number of entries per request).

use crate::ApiError;
use base64::Engine as _;
use std::collections::HashMap;

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;

/// The `limit` and `cursor` query parameters, as the OpenAPI document shows
/// them.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
}

/// A parsed page request: how many items, and the sort key to start after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Items per page.
    pub limit: usize,
    /// The sort key of the last item of the previous page, if any.
    pub after: Option<Vec<u8>>,
}

impl Page {
    /// Parses `limit` and `cursor` from a query string's parameters;
    /// other parameters are left to the caller.
    pub fn from_query(q: &HashMap<String, String>) -> Result<Page, ApiError> {
        let limit = match q.get("limit") {
            None => DEFAULT_LIMIT,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad(
                        "INVALID_LIMIT",
                        format!("limit {s:?} must be a whole number from 1 to {MAX_LIMIT}"),
                    ));
                }
            },
        };
        let after = match q.get("cursor") {
            None => None,
            Some(c) => Some(decode_cursor(c)?),
        };
        Ok(Page { limit, after })
    }

    /// The `after` key, which must be `len` bytes long (for lists sorted
    /// by a fixed-size key).
    pub fn after_bytes(&self, len: usize) -> Result<Option<&[u8]>, ApiError> {
        match &self.after {
            None => Ok(None),
            Some(b) if b.len() == len => Ok(Some(b)),
            Some(_) => Err(invalid_cursor()),
        }
    }

    /// The `after` key parsed as a `T` (for lists sorted by a name or
    /// checksum: a cursor that is not one is not one this list handed
    /// out).
    pub fn after_parsed<T: std::str::FromStr>(&self) -> Result<Option<T>, ApiError> {
        match self.after_str()? {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| invalid_cursor()),
        }
    }

    /// The `after` key as UTF-8 text (for lists sorted by a name).
    pub fn after_str(&self) -> Result<Option<&str>, ApiError> {
        match &self.after {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(Some)
                .map_err(|_| invalid_cursor()),
        }
    }

    /// Takes one page from `items` (sorted by key, ascending, starting
    /// after the cursor): at most `limit` items, and the cursor of the next
    /// page when more follow.
    pub fn take<K: AsRef<[u8]>, V>(
        &self,
        items: impl IntoIterator<Item = (K, V)>,
    ) -> (Vec<V>, Option<String>) {
        let mut out = Vec::with_capacity(self.limit.min(64));
        let mut last: Option<K> = None;
        let mut more = false;
        for (k, v) in items {
            if out.len() == self.limit {
                more = true;
                break;
            }
            out.push(v);
            last = Some(k);
        }
        let next = if more {
            last.map(|k| encode_cursor(k.as_ref()))
        } else {
            None
        };
        (out, next)
    }
}

/// The cursor naming `key` (the last item of a page).
pub fn encode_cursor(key: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

fn invalid_cursor() -> ApiError {
    ApiError::bad(
        "INVALID_CURSOR",
        "cursor is not one this endpoint handed out; pass the nextCursor of the previous \
         page, or omit it for the first page",
    )
}

/// The key a cursor names.
pub fn decode_cursor(c: &str) -> Result<Vec<u8>, ApiError> {
    if c.is_empty() || c.len() > 1024 {
        return Err(invalid_cursor());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| invalid_cursor())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_and_cursors_are_checked() {
        assert_eq!(
            Page::from_query(&q(&[])).unwrap(),
            Page {
                limit: DEFAULT_LIMIT,
                after: None
            }
        );
        assert_eq!(Page::from_query(&q(&[("limit", "1")])).unwrap().limit, 1);
        for bad in ["0", "-1", "1001", "x", "", "1.5"] {
            assert!(Page::from_query(&q(&[("limit", bad)])).is_err(), "{bad}");
        }
        for bad in ["", "!!", "a b"] {
            assert!(Page::from_query(&q(&[("cursor", bad)])).is_err(), "{bad}");
        }
        let c = encode_cursor(b"bob");
        let p = Page::from_query(&q(&[("cursor", &c)])).unwrap();
        assert_eq!(p.after_str().unwrap(), Some("bob"));
        // A cursor must have the shape of the list's keys.
        assert!(p.after_bytes(24).is_err());
        assert_eq!(p.after_bytes(3).unwrap(), Some(&b"bob"[..]));
        assert!(p.after_parsed::<u32>().is_err());
        let p = Page::from_query(&q(&[("cursor", &encode_cursor(b"42"))])).unwrap();
        assert_eq!(p.after_parsed::<u32>().unwrap(), Some(42));
        let p = Page::from_query(&q(&[("cursor", &encode_cursor(&[0xff, 0xfe]))])).unwrap();
        assert!(p.after_str().is_err(), "not UTF-8");
    }

    #[test]
    fn pages_end_with_no_cursor() {
        let p = Page {
            limit: 2,
            after: None,
        };
        let items = || ["a", "b", "c"].map(|k| (k, k.to_uppercase()));
        let (v, next) = p.take(items());
        assert_eq!(v, ["A", "B"]);
        assert_eq!(next.as_deref().map(decode_cursor).unwrap().unwrap(), b"b");
        let (v, next) = p.take(items().into_iter().skip(2));
        assert_eq!(v, ["C"]);
        assert_eq!(next, None);
        // Exactly `limit` items left: no further page.
        let (v, next) = p.take(items().into_iter().skip(1));
        assert_eq!(v.len(), 2);
        assert_eq!(next, None);
    }
}
