//! The `#[trellis_sdk::task]` attribute: turns one typed function into the
//! `info` and `run` exports of the `trellis:plugin/task` world.
//!
//! Use it through `trellis-sdk`, which re-exports it; the expansion names only
//! `::trellis_sdk` paths.

use proc_macro::TokenStream;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ItemFn, Meta, Token, parse_macro_input};

/// Export a function `fn(&StepContext, Input) -> Result<Output, TaskError>` as a
/// Trellis task. `Input` must implement `serde::Deserialize` and `Output`
/// `serde::Serialize`.
///
/// Arguments, all optional: `name`, `version`, `description` (default: the
/// package's name, version and description), `input_schema`, `output_schema`
/// (JSON Schema text, e.g. `include_str!("input.schema.json")`).
#[proc_macro_attribute]
pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    let parser = Punctuated::<Meta, Token![,]>::parse_terminated;
    let args = match parser.parse(args) {
        Ok(args) => args,
        Err(err) => return err.to_compile_error().into(),
    };
    let func = parse_macro_input!(item as ItemFn);

    let mut name: Expr = syn::parse_quote!(::core::env!("CARGO_PKG_NAME"));
    let mut version: Expr = syn::parse_quote!(::core::env!("CARGO_PKG_VERSION"));
    let mut description: Expr = syn::parse_quote!(::core::env!("CARGO_PKG_DESCRIPTION"));
    let mut input_schema: Expr = syn::parse_quote!(::core::option::Option::None::<&str>);
    let mut output_schema: Expr = syn::parse_quote!(::core::option::Option::None::<&str>);
    for arg in args {
        let Meta::NameValue(nv) = arg else {
            return syn::Error::new_spanned(arg, "expected `key = value`")
                .to_compile_error()
                .into();
        };
        let value = nv.value;
        let key = nv
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        match key.as_str() {
            "name" => name = value,
            "version" => version = value,
            "description" => description = value,
            "input_schema" => {
                input_schema = syn::parse_quote!(::core::option::Option::Some(#value))
            }
            "output_schema" => {
                output_schema = syn::parse_quote!(::core::option::Option::Some(#value))
            }
            _ => {
                return syn::Error::new_spanned(
                    nv.path,
                    "unknown argument; expected one of: name, version, description, input_schema, output_schema",
                )
                .to_compile_error()
                .into();
            }
        }
    }

    let fn_name = &func.sig.ident;
    quote! {
        #func

        #[doc(hidden)]
        struct __TrellisTask;

        impl ::trellis_sdk::bindings::Guest for __TrellisTask {
            fn info() -> ::trellis_sdk::PluginInfo {
                ::trellis_sdk::PluginInfo {
                    name: ::std::string::String::from(#name),
                    version: ::std::string::String::from(#version),
                    description: ::std::string::String::from(#description),
                    input_schema: #input_schema.map(::std::string::String::from),
                    output_schema: #output_schema.map(::std::string::String::from),
                }
            }

            fn run(
                ctx: ::trellis_sdk::StepContext,
                input: ::std::string::String,
            ) -> ::core::result::Result<::std::string::String, ::trellis_sdk::TaskError> {
                ::trellis_sdk::__private::run_json(&ctx, &input, #fn_name)
            }
        }

        ::trellis_sdk::bindings::export!(__TrellisTask with_types_in ::trellis_sdk::bindings);
    }
    .into()
}
