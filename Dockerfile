# Portcullis images: `portcullis` (API pods and dev mode) and `portcullis-operator`.
#   docker build --target portcullis -t portcullis .
#   docker build --target operator -t portcullis-operator .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portcullis -p portcullis-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER nonroot:nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/portcullis"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/portcullis-operator /usr/local/bin/portcullis-operator
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/portcullis-operator"]
