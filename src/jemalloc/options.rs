//! Where jemalloc reads its options in this build, and the snippets the crate prints to set
//! them.
//!
//! tikv-jemalloc-sys builds jemalloc with every public symbol prefixed `_rjem_` unless its
//! `unprefixed_malloc_on_supported_platforms` feature is on somewhere in the dependency graph
//! (and the platform supports it). The prefix decides both names jemalloc reads its options
//! under: the environment variable (`_RJEM_MALLOC_CONF` when prefixed, `MALLOC_CONF` when not;
//! the other one is ignored) and the symbol an application defines to build options into its
//! binary (`_rjem_malloc_conf` or `malloc_conf`).
//!
//! Which build this is, is read at run time rather than guessed from this crate's features,
//! because another crate of the graph may switch the feature on: tikv-jemalloc-sys declares
//! `malloc` under the link name `_rjem_malloc` when prefixed and `malloc` when not, so its
//! `malloc` is the C library's `malloc` exactly when jemalloc is unprefixed (the linker
//! resolves both declarations to the one `malloc` symbol of the process). This also holds
//! for a jemalloc supplied through `JEMALLOC_OVERRIDE`, which tikv-jemalloc-sys links under the
//! same names.

/// The names jemalloc reads its options under, in one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionNames {
    prefixed: bool,
}

impl OptionNames {
    /// A build whose jemalloc symbols carry tikv-jemalloc-sys's `_rjem_` prefix (its default).
    #[cfg_attr(all(jemalloc, not(test)), allow(dead_code))]
    pub(crate) const PREFIXED: Self = Self { prefixed: true };
    /// A build with `unprefixed_malloc_on_supported_platforms`: jemalloc is the C `malloc`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) const UNPREFIXED: Self = Self { prefixed: false };

    /// The names of the jemalloc this process runs (see the module's docs for how it is
    /// told). Builds without jemalloc answer [`PREFIXED`](Self::PREFIXED), tikv-jemalloc-sys's
    /// default; they never print these names.
    pub(crate) fn of_this_build() -> Self {
        #[cfg(jemalloc)]
        {
            extern "C" {
                /// The process's `malloc`: the C library's, or jemalloc's when unprefixed.
                fn malloc(size: usize) -> *mut std::ffi::c_void;
            }
            // Only the addresses are compared: nothing is called.
            let c_malloc = malloc as *const () as usize;
            let jemalloc_malloc = tikv_jemalloc_sys::malloc as *const () as usize;
            Self {
                prefixed: c_malloc != jemalloc_malloc,
            }
        }
        #[cfg(not(jemalloc))]
        Self::PREFIXED
    }

    /// Whether jemalloc's symbols carry the `_rjem_` prefix.
    pub(crate) fn prefixed(self) -> bool {
        self.prefixed
    }

    /// The environment variable jemalloc reads: `_RJEM_MALLOC_CONF` or `MALLOC_CONF`.
    pub(crate) fn environment_variable(self) -> &'static str {
        if self.prefixed {
            "_RJEM_MALLOC_CONF"
        } else {
            "MALLOC_CONF"
        }
    }

    /// The environment variable jemalloc does not read in this build (the other build's).
    pub(crate) fn ignored_environment_variable(self) -> &'static str {
        Self {
            prefixed: !self.prefixed,
        }
        .environment_variable()
    }

    /// The symbol jemalloc reads built-in options from: `_rjem_malloc_conf` or `malloc_conf`.
    pub(crate) fn symbol(self) -> &'static str {
        if self.prefixed {
            "_rjem_malloc_conf"
        } else {
            "malloc_conf"
        }
    }

    /// The Rust item that builds `options` into the binary, in the form every edition accepts
    /// (`unsafe(…)` is required from edition 2024 and accepted since Rust 1.82):
    /// `#[unsafe(export_name = "_rjem_malloc_conf")] pub static MALLOC_CONF: &[u8] = b"…\0";`.
    /// jemalloc reads the symbol as a `const char *`: the slice's first word, a pointer to the
    /// NUL-terminated bytes.
    pub(crate) fn built_in(self, options: &str) -> String {
        format!(
            "#[unsafe(export_name = \"{}\")] pub static MALLOC_CONF: &[u8] = b\"{options}\\0\";",
            self.symbol()
        )
    }

    /// Both ways of giving jemalloc `options` at start-up, as one clause: the environment
    /// variable, or the item that builds them into the binary.
    pub(crate) fn how_to_set(self, options: &str) -> String {
        format!(
            "start the process with the environment variable {}={options}, or build the \
             options into the binary: {}",
            self.environment_variable(),
            self.built_in(options)
        )
    }
}

/// The options the application built into its binary through jemalloc's `malloc_conf` symbol
/// (under this build's name), if it defines one.
#[cfg(jemalloc)]
pub(crate) fn built_in() -> Option<String> {
    // SAFETY: `malloc_conf` is jemalloc's `const char *malloc_conf` (declared by
    // tikv-jemalloc-sys under this build's link name). jemalloc defines it weak and null; an
    // application that builds options in defines it as a static pointer to a NUL-terminated
    // string, which jemalloc has already read at its initialisation (so it is in memory and
    // terminated, or the process would have failed then). Nothing writes it after start-up.
    #[allow(unsafe_code)]
    let pointer = unsafe { tikv_jemalloc_sys::malloc_conf };
    pointer.map(|first| {
        // SAFETY: as above, `first` points at a NUL-terminated string that lives for the
        // process's life.
        #[allow(unsafe_code)]
        let options = unsafe { std::ffi::CStr::from_ptr(first) };
        options.to_string_lossy().into_owned()
    })
}

/// Builds without jemalloc have no `malloc_conf` to read.
#[cfg(not(jemalloc))]
pub(crate) fn built_in() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let prefixed = OptionNames::PREFIXED;
        assert_eq!(prefixed.environment_variable(), "_RJEM_MALLOC_CONF");
        assert_eq!(prefixed.ignored_environment_variable(), "MALLOC_CONF");
        assert_eq!(prefixed.symbol(), "_rjem_malloc_conf");
        let unprefixed = OptionNames::UNPREFIXED;
        assert_eq!(unprefixed.environment_variable(), "MALLOC_CONF");
        assert_eq!(
            unprefixed.ignored_environment_variable(),
            "_RJEM_MALLOC_CONF"
        );
        assert_eq!(unprefixed.symbol(), "malloc_conf");
    }

    #[test]
    fn snippets_use_the_edition_2024_form_and_the_builds_symbol() {
        assert_eq!(
            OptionNames::PREFIXED.built_in("prof:true"),
            r#"#[unsafe(export_name = "_rjem_malloc_conf")] pub static MALLOC_CONF: &[u8] = b"prof:true\0";"#
        );
        assert_eq!(
            OptionNames::UNPREFIXED.how_to_set("background_thread:true"),
            "start the process with the environment variable MALLOC_CONF=background_thread:true, \
             or build the options into the binary: #[unsafe(export_name = \"malloc_conf\")] pub \
             static MALLOC_CONF: &[u8] = b\"background_thread:true\\0\";"
        );
    }

    /// tikv-jemalloc-sys's default build (this crate's tests do not switch the feature on).
    #[cfg(jemalloc)]
    #[test]
    fn this_build_is_prefixed() {
        assert!(OptionNames::of_this_build().prefixed());
    }
}
