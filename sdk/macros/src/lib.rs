//! Procedural macros of [`braid-sdk`](https://docs.rs/braid-sdk).
//!
//! Use them through `braid_sdk` (`#[braid_sdk::flow]`,
//! `#[braid_sdk::initiating_flow]`, `#[braid_sdk::responder_flow]`,
//! `braid_sdk::export_flows!`); the generated code refers to `::braid_sdk`
//! and its hidden runtime module, so this crate is not useful on its own.
//!
//! Each flow attribute leaves the function callable as an ordinary function
//! and adds a hidden module of the same name (modules and functions live in
//! different namespaces) holding a constant `__BRAID_FLOW` that describes
//! the flow (name, kind, protocol, entry point). `export_flows!` collects those
//! constants into the package's flow table and exports the component.

#![warn(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ExprArray, ExprLit, ItemFn, Lit, LitInt, LitStr, Path, Token, parse_macro_input};

/// Marks a plain flow: startable by a client, opens no sessions under a
/// protocol of its own. See `braid_sdk` for the rules.
#[proc_macro_attribute]
pub fn flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Plain, attr, item)
}

/// Marks an initiating flow: startable by a client, and the protocol its
/// sessions use. See `braid_sdk` for the rules.
#[proc_macro_attribute]
pub fn initiating_flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Initiating, attr, item)
}

/// Marks a responder flow: started by a session-init for its protocol. See
/// `braid_sdk` for the rules.
#[proc_macro_attribute]
pub fn responder_flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Responder, attr, item)
}

/// Exports the listed flows as the package's flows. See `braid_sdk`.
#[proc_macro]
pub fn export_flows(input: TokenStream) -> TokenStream {
    let paths = match Punctuated::<Path, Token![,]>::parse_terminated.parse(input) {
        Ok(paths) => paths,
        Err(e) => return e.to_compile_error().into(),
    };
    if paths.is_empty() {
        return syn::Error::new(Span::call_site(), "export_flows! needs at least one flow")
            .to_compile_error()
            .into();
    }
    let defs = paths.iter().map(|path| quote!(#path::__BRAID_FLOW));
    quote! {
        const _: () = {
            const FLOWS: &[::braid_sdk::__rt::FlowDef] = &[#(#defs),*];

            struct BraidFlowPackage;

            impl ::braid_sdk::__rt::Guest for BraidFlowPackage {
                fn describe() -> ::std::vec::Vec<::braid_sdk::__rt::FlowInfo> {
                    ::braid_sdk::__rt::describe(FLOWS)
                }

                fn run(
                    name: ::std::string::String,
                    how: ::braid_sdk::__rt::Start,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    ::braid_sdk::__rt::run(FLOWS, &name, how)
                }
            }

            ::braid_sdk::__bindings::__export_flow_package!(BraidFlowPackage);
        };
    }
    .into()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Initiating,
    Responder,
}

impl Kind {
    fn attribute(self) -> &'static str {
        match self {
            Kind::Plain => "flow",
            Kind::Initiating => "initiating_flow",
            Kind::Responder => "responder_flow",
        }
    }
}

#[derive(Default)]
struct Args {
    name: Option<LitStr>,
    /// A string literal, or the path of a `&str` constant (shared by the
    /// initiator's and the responder's crates).
    protocol: Option<Expr>,
    versions: Vec<LitInt>,
}

fn parse_args(kind: Kind, attr: TokenStream) -> syn::Result<Args> {
    let mut args = Args::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            args.name = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("protocol") && kind != Kind::Plain {
            let e: Expr = meta.value()?.parse()?;
            match &e {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(_), ..
                })
                | Expr::Path(_) => args.protocol = Some(e),
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "expected the protocol's name: \"...\" or the path of a `&str` constant",
                    ));
                }
            }
        } else if meta.path.is_ident("version") && kind != Kind::Plain {
            args.versions.push(meta.value()?.parse()?);
        } else if meta.path.is_ident("versions") && kind != Kind::Plain {
            let array: ExprArray = meta.value()?.parse()?;
            for elem in array.elems {
                match elem {
                    Expr::Lit(ExprLit {
                        lit: Lit::Int(v), ..
                    }) => args.versions.push(v),
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "expected an integer version",
                        ));
                    }
                }
            }
        } else {
            let allowed = if kind == Kind::Plain {
                "`name`"
            } else {
                "`name`, `protocol`, `version` or `versions`"
            };
            return Err(meta.error(format!(
                "unknown argument of #[{}]; expected {allowed}",
                kind.attribute()
            )));
        }
        Ok(())
    });
    parser.parse(attr)?;
    if kind != Kind::Plain {
        if args.protocol.is_none() {
            return Err(syn::Error::new(
                Span::call_site(),
                format!("#[{}] needs `protocol = \"...\"`", kind.attribute()),
            ));
        }
        if args.versions.is_empty() {
            return Err(syn::Error::new(
                Span::call_site(),
                format!(
                    "#[{}] needs `version = N` or `versions = [N, ...]`",
                    kind.attribute()
                ),
            ));
        }
        for v in &args.versions {
            v.base10_parse::<u32>()?;
        }
    }
    Ok(args)
}

fn expand(kind: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = match parse_args(kind, attr) {
        Ok(args) => args,
        Err(e) => return e.to_compile_error().into(),
    };
    let func = parse_macro_input!(item as ItemFn);
    match expand_fn(kind, args, func) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_fn(kind: Kind, args: Args, mut func: ItemFn) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    if sig.asyncness.is_some() {
        return Err(syn::Error::new_spanned(
            sig.asyncness,
            "flows are not async",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "flows cannot be generic",
        ));
    }
    if let Some(receiver) = sig.receiver() {
        return Err(syn::Error::new_spanned(
            receiver,
            "flows are free functions",
        ));
    }
    let arity = sig.inputs.len();
    let ident = sig.ident.clone();
    let vis = func.vis.clone();
    let name = args
        .name
        .map(|n| n.value())
        .unwrap_or_else(|| ident.to_string());
    let rt = quote!(::braid_sdk::__rt);
    // Evaluated in the hidden module below: a constant's path is resolved
    // as it is where the attribute is written.
    let protocol = args.protocol.clone().map(|p| {
        let versions = &args.versions;
        quote!(#rt::Protocol {
            name: {
                #[allow(unused_imports)]
                use super::*;
                #p
            },
            versions: &[#(#versions),*],
        })
    });

    let kind_tokens = match kind {
        Kind::Plain | Kind::Initiating => {
            let call = match arity {
                0 => quote!({
                    let _ = body;
                    super::#ident()
                }),
                1 => quote!(super::#ident(#rt::parse_args(body)?)),
                _ => {
                    return Err(syn::Error::new_spanned(
                        &sig.inputs,
                        "a client-startable flow takes at most one argument: its request body (any serde type)",
                    ));
                }
            };
            let entry = quote! {
                fn entry(body: &str) -> ::core::result::Result<::std::string::String, ::braid_sdk::FlowError> {
                    #rt::to_json(#call)
                }
            };
            match protocol {
                Some(p) => quote!({ #entry #rt::FlowKind::Initiating(#p, entry) }),
                None => quote!({ #entry #rt::FlowKind::Plain(entry) }),
            }
        }
        Kind::Responder => {
            if arity != 1 {
                return Err(syn::Error::new_spanned(
                    &sig.ident,
                    "a responder flow takes exactly one argument: its `Session`",
                ));
            }
            let p = protocol.expect("checked by parse_args");
            quote!({
                fn entry(session: ::braid_sdk::Session) -> ::core::result::Result<::std::string::String, ::braid_sdk::FlowError> {
                    #rt::to_json(super::#ident(session))
                }
                #rt::FlowKind::Responder(#p, entry)
            })
        }
    };

    if kind == Kind::Initiating {
        // The protocol is pushed for the whole call, so `Session::initiate`
        // in this flow and in plain helpers it calls uses it; the guard pops
        // it on every return path.
        let p = args.protocol.as_ref().expect("checked by parse_args");
        let versions = &args.versions;
        let guard: syn::Stmt = syn::parse_quote! {
            let __braid_protocol_guard = #rt::enter_initiating(#p, &[#(#versions),*]);
        };
        func.block.stmts.insert(0, guard);
    }

    Ok(quote! {
        #func

        // Lives in the type namespace under the function's name, so that
        // `use some::flow_fn;` also brings in what `export_flows!` needs.
        #[doc(hidden)]
        #vis mod #ident {
            // Unused when the flow only runs as a sub-flow.
            #[allow(dead_code)]
            pub const __BRAID_FLOW: #rt::FlowDef = #rt::FlowDef {
                name: #name,
                kind: #kind_tokens,
            };
        }
    })
}
