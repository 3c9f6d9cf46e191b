# Patches applied to llama-cpp-sys-2's vendored llama.cpp while it builds, as Ollama carries its
# own llama.cpp patches. llama-cpp-sys-2 hands every CMAKE_* environment variable to CMake as -D,
# and .cargo/config.toml sets CMAKE_PROJECT_INCLUDE to this file, so it runs after llama.cpp's
# project() call. The crate's sources in the Cargo registry stay untouched: each patched file is
# written to the build folder and swapped into its target's source list.
#
# A patch whose text is no longer found stops the build: a llama.cpp upgrade must look at it again.
include_guard(GLOBAL)

# target, source path relative to llama.cpp, text to find, replacement
function(llama_agent_patch target rel old new)
    set(src "${CMAKE_SOURCE_DIR}/${rel}")
    file(READ "${src}" text)
    string(FIND "${text}" "${old}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "llama-agent patch for ${rel} no longer applies: '${old}' not found")
    endif()
    string(REPLACE "${old}" "${new}" text "${text}")
    # The copy sits in a folder of its own; its quoted includes resolve through the target's
    # include directories, which list the original folder.
    set(out "${CMAKE_BINARY_DIR}/llama-agent-patched/${rel}")
    set(current "")
    if(EXISTS "${out}")
        file(READ "${out}" current)
    endif()
    if(NOT current STREQUAL text)
        file(WRITE "${out}" "${text}")
    endif()
    get_target_property(sources ${target} SOURCES)
    get_filename_component(name "${rel}" NAME)
    list(FIND sources "${name}" index)
    if(index EQUAL -1)
        message(FATAL_ERROR "llama-agent patch: ${name} is not a source of ${target}")
    endif()
    list(REMOVE_AT sources ${index})
    list(INSERT sources ${index} "${out}")
    set_target_properties(${target} PROPERTIES SOURCES "${sources}")
    message(STATUS "llama-agent patch applied: ${rel}")
endfunction()

function(llama_agent_apply_patches)
    # An embedding context never reads logits, yet llama.cpp reserves a logits buffer and copies
    # the LM head's output for every token to it: for a Qwen3-Embedding-shaped model that is
    # 151,936 floats per token, 300 MB per 500-token batch, most of each batch's time on a GPU.
    # Older llama.cpp had exactly this line; without a buffer the copy is skipped.
    llama_agent_patch(llama src/llama-context.cpp
        "bool has_logits     = true;"
        "bool has_logits     = !cparams.embeddings;")
    # A grammar that does not parse is reported on stderr only, with the whole grammar after it;
    # the log callback carries the reason to the request that sent the grammar instead.
    llama_agent_patch(llama src/llama-grammar.cpp
        [=[fprintf(stderr, "%s: error parsing grammar: %s\n\n%s\n", __func__, err.what(), src);]=]
        [=[LLAMA_LOG_ERROR("%s: error parsing grammar: %s\n", __func__, err.what());]=])
endfunction()

# Runs when llama.cpp's top-level CMakeLists.txt is done, so the targets exist.
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL llama_agent_apply_patches)
