/*
 * Stand-in for libsgx_dcap_quoteverify.so built by tests/test_providers.py.
 *
 * It exports the two entry points dcap_providers.NativeQvlVerifier binds, with the real prototypes
 * (sgx_dcap_quoteverify.h), and records what it was called with so the test can check that the
 * ctypes binding marshals every argument.  It does not verify anything: the verdict is read from
 * the quote bytes, so a test picks it by choosing report_data:
 *   report_data[0..4)  sgx_ql_qv_result_t to report        (little-endian u32)
 *   report_data[4..8)  collateral expiration status       (little-endian u32)
 *   report_data[8..12) quote3_error_t to return           (little-endian u32)
 * report_data sits at offset 48 + 384 - 64 = 368 of a quote.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

#define REPORT_DATA_OFFSET 368u
#define SGX_QL_SUCCESS 0x0000u
#define SGX_QL_ERROR_INVALID_PARAMETER 0xE002u

typedef struct {
    uint16_t major_version;
    uint16_t minor_version;
    uint32_t tee_type;
    char *pck_crl_issuer_chain;
    uint32_t pck_crl_issuer_chain_size;
    char *root_ca_crl;
    uint32_t root_ca_crl_size;
    char *pck_crl;
    uint32_t pck_crl_size;
    char *tcb_info_issuer_chain;
    uint32_t tcb_info_issuer_chain_size;
    char *tcb_info;
    uint32_t tcb_info_size;
    char *qe_identity_issuer_chain;
    uint32_t qe_identity_issuer_chain_size;
    char *qe_identity;
    uint32_t qe_identity_size;
} sgx_ql_qve_collateral_t;

static uint32_t g_supplemental_size = 1024;
static uint32_t g_supplemental_rc = SGX_QL_SUCCESS;

static int g_calls;
static uint32_t g_quote_size;
static uint64_t g_quote_fnv;
static int64_t g_date;
static int g_collateral_null = 1;
static uint32_t g_collateral_version;
static uint32_t g_collateral_tee_type;
static int g_report_info_null;
static uint32_t g_supp_size_arg;
static int g_supp_null;
static uint32_t g_field_sizes[7];
static char g_field_copy[7][65536];

void stub_set_supplemental(uint32_t size, uint32_t rc) {
    g_supplemental_size = size;
    g_supplemental_rc = rc;
}

int stub_calls(void) { return g_calls; }
uint32_t stub_quote_size(void) { return g_quote_size; }
uint64_t stub_quote_fnv(void) { return g_quote_fnv; }
int64_t stub_date(void) { return g_date; }
int stub_collateral_null(void) { return g_collateral_null; }
uint32_t stub_collateral_version(void) { return g_collateral_version; }
uint32_t stub_collateral_tee_type(void) { return g_collateral_tee_type; }
int stub_report_info_null(void) { return g_report_info_null; }
uint32_t stub_supp_size_arg(void) { return g_supp_size_arg; }
int stub_supp_null(void) { return g_supp_null; }

/* Copy of collateral field i as it was during the call; returns its declared size. */
uint32_t stub_collateral_field(int i, char *out, uint32_t cap) {
    if (i < 0 || i > 6)
        return 0;
    uint32_t n = g_field_sizes[i] < cap ? g_field_sizes[i] : cap;
    memcpy(out, g_field_copy[i], n);
    return g_field_sizes[i];
}

uint32_t sgx_qv_get_quote_supplemental_data_size(uint32_t *p_data_size) {
    if (p_data_size == NULL)
        return SGX_QL_ERROR_INVALID_PARAMETER;
    *p_data_size = g_supplemental_size;
    return g_supplemental_rc;
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void record_field(int i, const char *p, uint32_t size) {
    g_field_sizes[i] = size;
    if (p != NULL)
        memcpy(g_field_copy[i], p, size < sizeof g_field_copy[i] ? size : sizeof g_field_copy[i]);
}

uint32_t sgx_qv_verify_quote(const uint8_t *p_quote, uint32_t quote_size,
                             const sgx_ql_qve_collateral_t *p_quote_collateral,
                             const time_t expiration_check_date,
                             uint32_t *p_collateral_expiration_status,
                             uint32_t *p_quote_verification_result,
                             void *p_qve_report_info,
                             uint32_t supplemental_data_size,
                             uint8_t *p_supplemental_data) {
    g_calls++;
    g_quote_size = quote_size;
    g_date = (int64_t)expiration_check_date;
    g_report_info_null = p_qve_report_info == NULL;
    g_supp_size_arg = supplemental_data_size;
    g_supp_null = p_supplemental_data == NULL;
    g_quote_fnv = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; p_quote != NULL && i < quote_size; i++) {
        g_quote_fnv ^= p_quote[i];
        g_quote_fnv *= 0x100000001b3ull;
    }
    g_collateral_null = p_quote_collateral == NULL;
    memset(g_field_sizes, 0, sizeof g_field_sizes);
    if (p_quote_collateral != NULL) {
        g_collateral_version = (uint32_t)p_quote_collateral->major_version |
                               (uint32_t)p_quote_collateral->minor_version << 16;
        g_collateral_tee_type = p_quote_collateral->tee_type;
        record_field(0, p_quote_collateral->pck_crl_issuer_chain,
                     p_quote_collateral->pck_crl_issuer_chain_size);
        record_field(1, p_quote_collateral->root_ca_crl, p_quote_collateral->root_ca_crl_size);
        record_field(2, p_quote_collateral->pck_crl, p_quote_collateral->pck_crl_size);
        record_field(3, p_quote_collateral->tcb_info_issuer_chain,
                     p_quote_collateral->tcb_info_issuer_chain_size);
        record_field(4, p_quote_collateral->tcb_info, p_quote_collateral->tcb_info_size);
        record_field(5, p_quote_collateral->qe_identity_issuer_chain,
                     p_quote_collateral->qe_identity_issuer_chain_size);
        record_field(6, p_quote_collateral->qe_identity, p_quote_collateral->qe_identity_size);
    }

    /* The real library's parameter checks. */
    if (p_quote == NULL || p_collateral_expiration_status == NULL || p_quote_verification_result == NULL)
        return SGX_QL_ERROR_INVALID_PARAMETER;
    if ((p_supplemental_data == NULL) != (supplemental_data_size == 0))
        return SGX_QL_ERROR_INVALID_PARAMETER;
    if (supplemental_data_size != 0 && supplemental_data_size != g_supplemental_size)
        return SGX_QL_ERROR_INVALID_PARAMETER;
    if (quote_size < REPORT_DATA_OFFSET + 12)
        return 0xE01Du; /* SGX_QL_QUOTE_FORMAT_UNSUPPORTED */

    const uint8_t *rd = p_quote + REPORT_DATA_OFFSET;
    uint32_t rc = le32(rd + 8);
    if (rc != SGX_QL_SUCCESS)
        return rc;
    *p_quote_verification_result = le32(rd);
    *p_collateral_expiration_status = le32(rd + 4);
    if (p_supplemental_data != NULL)
        memset(p_supplemental_data, 0x5a, supplemental_data_size);
    return SGX_QL_SUCCESS;
}
