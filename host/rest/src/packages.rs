//! Packages: upload, list, get, delete when unused.

use super::*;

pub(crate) fn package_view(p: &PackageRecord) -> openapi::Package {
    openapi::Package {
        checksum: p.checksum.to_string(),
        flows: p.flows.clone(),
        size: p.size,
        uploaded: timestamp(p.uploaded_ms),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/package",
    tag = "packages",
    summary = "Upload a package",
    request_body(content = openapi::PackageBytes, content_type = "application/octet-stream", description = "The package's .wasm bytes (`braid package build`)"),
    responses(
        (status = 201, description = "Uploaded", body = openapi::Package),
        (status = 200, description = "The same bytes were uploaded before", body = openapi::Package),
        (status = 400, description = "Empty body (`EMPTY_PACKAGE`) or not a braid package (`INVALID_PACKAGE`)", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn upload_package(
    State(c): State<Ctx>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    if body.is_empty() {
        return Err(ApiError::bad(
            "EMPTY_PACKAGE",
            "the request body must be the package's .wasm bytes",
        ));
    }
    let (rec, created) = c
        .worker
        .upload_package(body.to_vec())
        .await
        .map_err(|e| match e {
            WorkerError::Invalid(m) => ApiError::bad("INVALID_PACKAGE", m),
            e => e.into(),
        })?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(package_view(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/package",
    tag = "packages",
    summary = "List packages (paginated, by checksum)",
    params(page::PageParams),
    responses(
        (status = 200, description = "A page of packages", body = openapi::PackageList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
    ),
)]
pub(crate) async fn list_packages(
    State(c): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<openapi::PackageList>, ApiError> {
    let page = Page::from_query(&q)?;
    let mut all = c.worker.packages();
    all.sort_by_key(|p| p.checksum.to_string());
    let after = page.after_parsed::<Checksum>()?.map(|c| c.to_string());
    let items = all
        .iter()
        .map(|p| (p.checksum.to_string(), p))
        .filter(|(k, _)| after.as_deref().is_none_or(|a| k.as_str() > a));
    let (ps, next_cursor) = page.take(items);
    Ok(Json(openapi::PackageList {
        packages: ps.into_iter().map(package_view).collect(),
        next_cursor,
    }))
}

pub(crate) fn checksum_path(s: &str) -> Result<Checksum, ApiError> {
    s.parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(format!("no package {s:?}: {e}")))
}

#[utoipa::path(
    get,
    path = "/api/v1/package/{checksum}",
    tag = "packages",
    summary = "Get a package",
    params(
        ("checksum" = String, Path, description = "The package's SHA-256 checksum (64 hex digits)"),
    ),
    responses(
        (status = 200, description = "The package", body = openapi::Package),
        (status = 404, description = "No such package", body = openapi::Problem),
    ),
)]
pub(crate) async fn get_package(
    State(c): State<Ctx>,
    Path(cs): Path<String>,
) -> Result<Json<openapi::Package>, ApiError> {
    let cs = checksum_path(&cs)?;
    let p = c
        .worker
        .package(&cs)
        .ok_or_else(|| ApiError::not_found(format!("no package with checksum {cs}")))?;
    Ok(Json(package_view(&p)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/package/{checksum}",
    tag = "packages",
    summary = "Delete a package no virtual node or unfinished flow uses",
    params(
        ("checksum" = String, Path, description = "The package's SHA-256 checksum (64 hex digits)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such package", body = openapi::Problem),
        (status = 409, description = "The package is in use", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn delete_package(
    State(c): State<Ctx>,
    Path(cs): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.worker.delete_package(checksum_path(&cs)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
