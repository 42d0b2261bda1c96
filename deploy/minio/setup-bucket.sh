#!/bin/sh
# One-shot MinIO set-up for Bora, run by the `minio-setup` compose service (image minio/mc). Idempotent.
#  1. the video bucket;
#  2. a lifecycle rule expiring objects after ceil(BORA_RETENTION_SECONDS / 86400) days (S3 expiry is in whole
#     days, counted from the upload): a backstop to the services' own retention sweeper;
#  3. a user for Bora (BORA_S3_ACCESS_KEY_ID) limited to that bucket, so the API and workers never hold
#     MinIO's root credentials.
set -eu

: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${BORA_S3_BUCKET:?}" "${BORA_S3_ACCESS_KEY_ID:?}" "${BORA_S3_SECRET_ACCESS_KEY:?}"
retention_seconds="${BORA_RETENTION_SECONDS:-${BORA_JOB_RETENTION_SECONDS:-604800}}"  # the old name still works

days=$(( (retention_seconds + 86399) / 86400 ))
if [ "$days" -lt 1 ]; then days=1; fi

mc alias set bora "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "bora/$BORA_S3_BUCKET"

# Replace earlier rules so that a changed retention takes effect on the next `docker compose up`.
mc ilm rule rm --all --force "bora/$BORA_S3_BUCKET" >/dev/null 2>&1 || true
mc ilm rule add --expire-days "$days" "bora/$BORA_S3_BUCKET"

policy_file="$(mktemp)"
cat > "$policy_file" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$BORA_S3_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::$BORA_S3_BUCKET/*"]}
  ]
}
POLICY
mc admin policy create bora bora-videos-rw "$policy_file"
mc admin user add bora "$BORA_S3_ACCESS_KEY_ID" "$BORA_S3_SECRET_ACCESS_KEY"
# `attach` fails when the policy is already attached (a re-run); the user-info check below is the real test.
mc admin policy attach bora bora-videos-rw --user "$BORA_S3_ACCESS_KEY_ID" >/dev/null 2>&1 || true
mc admin user info bora "$BORA_S3_ACCESS_KEY_ID" | grep -q bora-videos-rw
rm -f "$policy_file"
echo "minio-setup: bucket=$BORA_S3_BUCKET expiry=${days}d user=$BORA_S3_ACCESS_KEY_ID"
