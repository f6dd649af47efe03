//! Workers' settings are `#[derive(clap::Args)]` structs, each in its
//! worker's crate, with every default written once, in its `#[arg]`. A
//! program that builds settings in code (a test, the benchmark) gets the
//! same defaults from [`defaults`] or [`parse`], never from a copy.

/// `T` with every setting at its default, as `braid node start` would
/// have it given no flags (an environment variable a setting reads, e.g.
/// `BRAID_MAX_LIVE_FLOWS`, still counts).
///
/// # Panics
/// If a setting of `T` is required (has no default): a programming error.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    parse(std::iter::empty::<&str>()).unwrap_or_else(|e| {
        panic!(
            "every setting of {} has a default: {e}",
            std::any::type_name::<T>()
        )
    })
}

/// `T` from command-line flags (without the program's name), e.g.
/// `["--data-dir", "/tmp/x"]`; a clear error for a bad one.
pub fn parse<T, I, S>(args: I) -> Result<T, clap::Error>
where
    T: clap::Args + clap::FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let cmd = T::augment_args(clap::Command::new("settings").no_binary_name(true));
    let m = cmd.try_get_matches_from(args)?;
    T::from_arg_matches(&m)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, clap::Args, PartialEq)]
    struct S {
        #[arg(long, default_value_t = 7)]
        n: u32,
        #[arg(long, default_value = "x")]
        name: String,
    }

    #[test]
    fn defaults_are_the_flags_defaults_and_flags_override_them() {
        assert_eq!(
            super::defaults::<S>(),
            S {
                n: 7,
                name: "x".into()
            }
        );
        let s: S = super::parse(["--n", "9"]).unwrap();
        assert_eq!(s.n, 9);
        let e = super::parse::<S, _, _>(["--n", "nine"]).unwrap_err();
        assert!(e.to_string().contains("--n"), "{e}");
    }
}
