//! The OpenAPI document, generated from the handlers' annotations and the types they use.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{batch, callbacks, correspondence, error, health, inbox, log, postal, providers};

#[derive(OpenApi)]
#[openapi(
    info(title = "Dalil", description = "Delivery and proof of delivery of official correspondence."),
    paths(
        health::healthz, health::readyz,
        correspondence::submit, batch::submit, correspondence::list, correspondence::get_one, correspondence::recall, correspondence::templates,
        inbox::list, inbox::open, inbox::attachment, inbox::acknowledge,
        log::latest, log::at_size, log::inclusion, log::consistency, log::keys,
        log::agency_bundle, log::citizen_bundle, log::verify,
        providers::sms_report,
        callbacks::create, callbacks::list, callbacks::remove, callbacks::deliveries, callbacks::replay,
        postal::claim, postal::pdf, postal::event, postal::bulk,
    ),
    components(schemas(error::Problem)),
    modifiers(&Security),
    tags(
        (name = "agency", description = "Agencies send correspondence and follow it (API key)."),
        (name = "callbacks", description = "Agencies' callback URLs: signed POSTs of their items' events (API key)."),
        (name = "citizen", description = "Citizens read their inbox (identity-provider token)."),
        (name = "log", description = "The evidence log: checkpoints, proofs, keys, verification (public)."),
        (name = "postal", description = "Postal operators: claim letters, fetch PDFs, report handover (operator key)."),
        (name = "providers", description = "Callbacks from SMS gateways (shared secret)."),
        (name = "operations", description = "Health and readiness."),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "agency_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An agency API key (dalil_…)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "operator_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A postal operator key (dalilop_…)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "citizen_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A token of the national identity provider (EdDSA), sub = PINFL"))
                    .build(),
            ),
        );
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
